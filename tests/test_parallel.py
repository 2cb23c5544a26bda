"""dsv3.train.parallel on 2 processes over gloo (seconds): expert parallelism computes what the unsplit MoE computes
(outputs, input gradients, expert weight gradients); a model under FSDP2 + EP=2 with MTP and the sequence-wise
balance loss has the one-process loss, gradient norm and clipped gradients; FP8 layers converted before sharding
(the split experts too) give the one-process FP8 loss."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from dsv3.fp8 import convert_to_fp8
from dsv3.model import DSV3ForCausalLM
from dsv3.model.moe import MoE
from dsv3.train.parallel import ExpertParallel, clip_grad_norm, parallelize
from tests.toy_model import toy_config

WORLD = 2
MOE = dict(n_routed_experts=8, num_experts_per_tok=3, n_group=1, topk_group=1)
LM = dict(vocab_size=64, num_nextn_predict_layers=1, aux_loss_alpha=0.01, max_position_embeddings=32) | MOE
MAX_NORM = 0.05  # below the gradient norm: the clip is exercised


def moe_and_batch():
    torch.manual_seed(0)
    moe = MoE(toy_config(**MOE))  # a bare module: its weights are uninitialised until filled
    with torch.no_grad():
        for param in moe.parameters():
            param.normal_(std=0.1)
        moe.gate.e_score_correction_bias.uniform_(-0.1, 0.1)  # a trained router's biases
    x = torch.randn(WORLD * 3, 8, 32)
    return moe, x, torch.randn(WORLD * 3, 8, 32)


def lm_and_batch():
    torch.manual_seed(0)
    model = DSV3ForCausalLM(toy_config(**LM))
    return model, torch.randint(0, 64, (WORLD * 2, 16))


def lm_loss(model, ids):
    out = model(input_ids=ids, labels=ids, use_cache=False)
    return out.loss + 0.3 * out.mtp_losses.mean() + out.balance_loss


def _rank(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        moe, x, weight = moe_and_batch()
        moe.experts = ExpertParallel(moe.experts, init_device_mesh("cpu", (WORLD,)))
        mine = slice(rank * 3, rank * 3 + 3)  # this rank's share of the batch
        x = x[mine].clone().requires_grad_()
        y, _ = moe(x)
        (y * weight[mine]).sum().backward()
        expert_grads = {n: p.grad.to_local() for n, p in moe.experts.named_parameters()}

        model, ids = lm_and_batch()
        parallelize(model, WORLD, "cpu", expert_parallel=WORLD)
        loss = lm_loss(model, ids[rank * 2 : rank * 2 + 2])
        loss.backward()
        norm = clip_grad_norm(list(model.parameters()), MAX_NORM)
        grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for n, p in model.named_parameters()}

        fp8, ids = lm_and_batch()
        convert_to_fp8(fp8, "emulated")  # before sharding, as CausalLMTraining.configure_model does
        parallelize(fp8, WORLD, "cpu", expert_parallel=WORLD)
        with torch.autocast("cpu", torch.bfloat16):  # as the FP8 precision plugin runs the step
            fp8_loss = lm_loss(fp8, ids[rank * 2 : rank * 2 + 2])
        experts_fp8 = fp8.model.layers[-1].mlp.experts.fp8
        torch.save(
            {"y": y.detach(), "x_grad": x.grad, "expert_grads": expert_grads, "loss": loss.detach(), "norm": norm,
             "grads": grads, "fp8_loss": fp8_loss.detach(), "experts_fp8": experts_fp8},
            Path(out) / f"rank{rank}.pt",
        )  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parallel")
    # forked, not spawned: a spawned process imports torch and transformers again (~10 s on 2 cores)
    mp.start_processes(_rank, args=(str(folder / "store"), str(folder)), nprocs=WORLD, join=True, start_method="fork")
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_expert_parallel_forward_and_backward_equal_the_unsplit_moe(ranks):
    moe, x, weight = moe_and_batch()
    x.requires_grad_()
    y, _ = moe(x)
    (y * weight).sum().backward()
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), x.grad, rtol=0, atol=1e-6)
    for name in ("gate_up_proj", "down_proj"):  # each rank holds half the experts: its slice of the full gradient
        full = getattr(moe.experts, name).grad
        torch.testing.assert_close(torch.cat([r["expert_grads"][name] for r in ranks]), full, rtol=0, atol=1e-5)
        assert ranks[0]["expert_grads"][name].shape[0] == MOE["n_routed_experts"] // WORLD


def test_fsdp_and_expert_parallel_with_mtp_have_the_one_process_gradients(ranks):
    model, ids = lm_and_batch()
    halves = [lm_loss(model, ids[r * 2 : r * 2 + 2]) for r in range(WORLD)]
    torch.stack(halves).mean().backward()  # FSDP2 averages the ranks' gradients
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    for rank, half in zip(ranks, halves, strict=True):
        torch.testing.assert_close(rank["loss"], half.detach(), rtol=0, atol=1e-6)
    assert float(norm) > MAX_NORM
    for rank in ranks:
        torch.testing.assert_close(rank["norm"], norm, rtol=1e-6, atol=0)
        for name, param in model.named_parameters():
            torch.testing.assert_close(rank["grads"][name], param.grad, rtol=0, atol=1e-6, msg=name)


def test_fp8_layers_and_split_experts_run_in_fp8_under_fsdp(ranks):
    model, ids = lm_and_batch()
    plain = [float(lm_loss(model, ids[r * 2 : r * 2 + 2])) for r in range(WORLD)]
    convert_to_fp8(model, "emulated")
    with torch.autocast("cpu", torch.bfloat16):
        fp8 = [float(lm_loss(model, ids[r * 2 : r * 2 + 2])) for r in range(WORLD)]
    for rank, one_process, unquantised in zip(ranks, fp8, plain, strict=True):
        assert rank["experts_fp8"] == ("emulated", "blockwise")
        assert float(rank["fp8_loss"]) == pytest.approx(one_process, abs=1e-6)
        assert abs(one_process - unquantised) > 1e-5  # FP8 changed the loss (by ~1e-4 here): it ran
