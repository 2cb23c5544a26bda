"""dsv3/train/compile.py (regional torch.compile of every block) and the compiled MoE dispatch of
dsv3/model/moe.py: a compiled block computes what the eager one does (forward and every gradient within 1e-5 in
fp32), compiles to one graph (no graph break) and does not recompile when the tokens per expert change; a smoke
pretraining with `pretrain.compile=true` ends at the eager run's validation loss (within 1e-3 nats), resumes from
its checkpoints after an interruption, and writes a model folder transformers loads.

Shapes are the smoke recipe's (its model, 4 × 64-token micro-batches) and the block runs in training mode with
deterministic algorithms on, as in the pretraining, so the pretraining test reuses the block compiled here.
"""

import copy
import sys

import pytest
import torch
from torch._dynamo.utils import counters

from dsv3.config import load_recipe
from dsv3.model import DSV3ForCausalLM
from dsv3.stages import run_stage
from dsv3.train.compile import compile_blocks, compiled_blocks
from dsv3.train.fit import deterministic_algorithms
from tests.conftest import RECIPES

SMOKE = load_recipe(RECIPES / "smoke.yaml")
B, T = SMOKE.pretrain.micro_batch_size, SMOKE.data.seq_len
TOLERANCE = 1e-5  # fp32: inductor's fused kernels reorder sums; measured differences are ~1e-7


def graphs_and_frames() -> tuple[int, int]:
    """(graphs compiled, frames compiled) so far in this process: a graph break makes a frame two graphs, a
    recompilation adds a frame."""
    return counters["stats"]["unique_graphs"], counters["frames"]["ok"]


def graph_breaks() -> int:
    """Graph breaks dynamo has met so far in this process."""
    return sum(counters["graph_break"].values())


class Blocks:
    """The smoke model's first MoE block, eagerly and compiled (same weights), and inputs for it."""

    def __init__(self):
        torch.manual_seed(0)
        model = DSV3ForCausalLM(SMOKE.model.config(vocab_size=512)).train()
        for p in model.parameters():  # larger than the 0.006 init, so every part of the block carries signal
            p.data.normal_(0, 0.2)
        self.model = model
        self.eager = model.model.layers[1]
        assert self.eager.is_moe
        self.compiled = compile_blocks(copy.deepcopy(self.eager))
        self.cos, self.sin = model.model.rotary_emb(torch.arange(T)[None].expand(B, T))

    def run(self, block, x: torch.Tensor, grad: torch.Tensor):
        """Forward (as DSV3Model calls a block in training) and backward of <y, grad> + balance loss."""
        x = x.clone().requires_grad_()
        with deterministic_algorithms(True):
            y, balance = block(x, self.cos, self.sin, None, cache=None, token_mask=None)
            ((y * grad).sum() + balance).backward()
        grads = {"x": x.grad} | {name: p.grad.clone() for name, p in block.named_parameters()}
        block.zero_grad(set_to_none=True)
        return y.detach(), balance.detach(), block.mlp.gate.expert_load.clone(), grads

    def route_to(self, experts: list[int] | None) -> None:
        """Router biases that send every token to `experts` (None: no bias, the learned routing)."""
        for block in (self.eager, self.compiled):
            bias = block.mlp.gate.e_score_correction_bias
            bias.zero_()
            if experts is not None:
                bias[experts] = 100.0


@pytest.fixture(scope="module", autouse=True)
def keep_sys_path():
    """Inductor's C++ build imports setuptools, which appends its _vendor folder to sys.path: importlib.metadata would
    then list setuptools' vendored packages as installed (tests/test_requirements_lock.py checks that list)."""
    before = list(sys.path)
    yield
    sys.path[:] = before


@pytest.fixture(scope="module")
def blocks():
    before, blocks_breaks = graphs_and_frames(), graph_breaks()
    blocks = Blocks()
    x, grad = torch.randn(B, T, blocks.model.config.hidden_size), torch.randn(B, T, blocks.model.config.hidden_size)
    blocks.first = blocks.run(blocks.eager, x, grad), blocks.run(blocks.compiled, x, grad)
    blocks.compiled_by_first_call = tuple(after - b for after, b in zip(graphs_and_frames(), before, strict=True))
    blocks.breaks_before = blocks_breaks
    return blocks


def test_compile_blocks_compiles_every_block_in_place_and_keeps_parameter_names():
    model = DSV3ForCausalLM(SMOKE.model.config(vocab_size=512))
    keys = list(model.state_dict())
    assert compile_blocks(model) is model
    assert len(compiled_blocks(model)) == len(model.model.layers) == 3  # dense, MoE, and the MTP block
    assert list(model.state_dict()) == keys and not any("_orig_mod" in k for k in keys)
    with pytest.raises(ValueError, match="no DecoderLayer"):
        compile_blocks(torch.nn.Linear(2, 2))


def test_compiled_block_equals_eager_forward_and_gradients(blocks):
    (y, balance, load, grads), (y_c, balance_c, load_c, grads_c) = blocks.first
    torch.testing.assert_close(y_c, y, rtol=TOLERANCE, atol=TOLERANCE)
    torch.testing.assert_close(balance_c, balance, rtol=TOLERANCE, atol=TOLERANCE)
    assert torch.equal(load_c, load) and load.sum() == B * T * SMOKE.model.num_experts_per_tok
    assert grads_c.keys() == grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name  # every parameter (router, experts, shared expert, MLA) gets a gradient
        torch.testing.assert_close(grads_c[name], grad, rtol=TOLERANCE, atol=TOLERANCE, msg=name)


def test_one_graph_and_no_recompilation_when_the_expert_loads_change(blocks):
    before = graphs_and_frames()
    loads = []
    g = torch.Generator().manual_seed(1)
    for experts in (None, [0, 1], [6, 7], [2, 5], None):
        blocks.route_to(experts)
        x = torch.randn(B, T, blocks.model.config.hidden_size, generator=g)
        grad = torch.randn(x.shape, generator=g)
        y, _, load, grads = blocks.run(blocks.eager, x, grad)
        y_c, _, load_c, grads_c = blocks.run(blocks.compiled, x, grad)
        assert torch.equal(load_c, load)
        torch.testing.assert_close(y_c, y, rtol=TOLERANCE, atol=TOLERANCE)
        torch.testing.assert_close(grads_c["mlp.experts.gate_up_proj"], grads["mlp.experts.gate_up_proj"],
                                   rtol=TOLERANCE, atol=TOLERANCE)
        loads.append(load)
    blocks.route_to(None)
    assert len({tuple(load.tolist()) for load in loads}) == len(loads)  # five different loads
    assert loads[1][[0, 1]].sum() == B * T * 2 and loads[1][2:].sum() == 0  # all tokens on two experts, six idle
    assert graphs_and_frames() == before  # nothing compiled again
    assert blocks.compiled_by_first_call == (1, 1)  # one frame, one graph: no graph break in the block
    assert graph_breaks() == blocks.breaks_before


def test_smoke_pretraining_compiled_matches_eager_and_resumes(runs_dir, blocks, monkeypatch):
    """16 steps eagerly, then compiled: interrupted at step 7 (checkpoint of step 4 kept), resumed, finished."""
    import dsv3.train.module as module
    from dsv3.errors import TrainingDiverged

    def recipe(*overrides):  # one validation, at the end (no mid-run no_grad pass to compile as well)
        r = load_recipe(RECIPES / "smoke.yaml", ["name=smoke-compile", "pretrain.val_every_n_steps=100", *overrides])
        run_stage("tokenizer", r, runs_dir)
        run_stage("tokenizer", r, compiled_runs)
        return r

    compiled_runs = runs_dir.parent / "compiled-runs"  # compile is hardware-only (not in the key): its own folder

    assert SMOKE.pretrain.compile is False  # eager is the default
    before = graphs_and_frames()
    eager = run_stage("pretrain", recipe(), runs_dir).manifest.metrics
    assert graphs_and_frames() == before
    compiled = recipe("pretrain.compile=true")
    assert run_stage("pretrain", compiled, runs_dir).action == "skipped"  # the eager run's stage, by its key
    real = module.learning_rate
    monkeypatch.setattr(module, "learning_rate", lambda tokens, total, s: float("nan") if tokens >= 6 * 8 * 64 else real(tokens, total, s))
    with pytest.raises(TrainingDiverged, match="at step 7"):
        run_stage("pretrain", compiled, compiled_runs)
    monkeypatch.setattr(module, "learning_rate", real)
    resumed = run_stage("pretrain", compiled, compiled_runs)
    assert resumed.action == "resumed" and resumed.manifest.metrics["resumed_from_step"] == 4
    got = resumed.manifest.metrics
    assert got["steps"] == eager["steps"] == 16
    assert got["final_val_loss"] == pytest.approx(eager["final_val_loss"], abs=1e-3)
    assert got["final_train_loss"] == pytest.approx(eager["final_train_loss"], abs=1e-3)
    graphs, frames = (after - b for after, b in zip(graphs_and_frames(), before, strict=True))
    assert graphs == frames == 5  # dense and MTP blocks in training (MoE: compiled above), all three kinds in evaluation
    assert graph_breaks() == blocks.breaks_before

    # checkpoints hold the plain parameter names; the model folder loads with transformers alone
    from transformers import AutoModelForCausalLM

    checkpoint = torch.load(resumed.workdir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    names = [k.removeprefix("model.") for k in checkpoint["state_dict"]]
    model = AutoModelForCausalLM.from_pretrained(resumed.workdir / "model")
    assert set(names) == set(model.state_dict()) and not any("_orig_mod" in k for k in names)
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    assert torch.isfinite(model(input_ids=ids).logits).all()
