"""The memory plan (dsv3/train/plan.py, `dsv3 plan`): exact parameter counts, how each layout divides them, an
activation estimate that tracks what autograd really saves, one-line errors."""

import pytest
import torch

from dsv3.cli import main
from dsv3.config import load_recipe
from dsv3.model import DSV3ForCausalLM, count_parameters
from dsv3.train.plan import (
    GiB,
    activation_bytes,
    activation_bytes_per_token,
    bytes_per_parameter,
    checkpointed_blocks,
    copies_bytes,
    fewest_devices,
    parameter_groups,
    plan,
    planned_model,
    row,
)
from dsv3.train.recompute import checkpoint_blocks
from tests.conftest import RECIPES

TINY = RECIPES / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny():
    recipe = load_recipe(TINY)
    return recipe, planned_model(recipe)


def test_parameter_total_is_count_parameters_plus_mtp(tiny):
    recipe, model = tiny
    counts = count_parameters(model.config)
    groups = parameter_groups(model.weights)
    assert sum(groups.values()) == counts["total"] + counts["mtp"]
    assert groups["MTP modules"] == counts["mtp"]
    c = model.config
    n_moe = c.num_hidden_layers - c.first_k_dense_replace
    assert groups["routed experts"] == n_moe * c.n_routed_experts * 3 * c.hidden_size * c.moe_intermediate_size
    assert groups["embedding and head"] == 2 * recipe.tokenizer.vocab_size * c.hidden_size  # null = the tokenizer's
    assert model.vocab_source.startswith("tokenizer.vocab_size")


def test_fsdp_shards_divide_ddp_by_the_devices(tiny):
    recipe, model = tiny
    ddp, fsdp = plan(recipe, 4, model=model)  # every tiny dimension is a multiple of 4: exact
    assert (ddp.strategy, fsdp.strategy) == ("DDP", "FSDP")
    for field in ("parameters", "params", "grads", "optimizer"):
        assert getattr(fsdp, field) * 4 == getattr(ddp, field)
    _, fsdp3 = plan(recipe, 3, model=model)  # FSDP2 pads each first dimension to a multiple of 3
    rows_padded = sum(w.numel // w.shape[0] for w in model.weights)  # at most one row per tensor
    assert ddp.params / 3 <= fsdp3.params <= ddp.params / 3 + rows_padded * 4


def test_expert_parallel_shards_the_experts_over_the_ranks_beside_it(tiny):
    recipe, model = tiny
    experts = sum(w.numel for w in model.weights if w.expert)  # the main model's and the MTP module's
    assert experts == parameter_groups(model.weights)["routed experts"] + sum(
        w.numel for w in model.weights if w.expert and w.group == "MTP modules"
    )
    ddp, fsdp, ep = plan(recipe, 4, expert_parallel=2, model=model)
    assert ep.strategy == "FSDP+EP" and ep.expert_parallel == 2
    total = ddp.parameters
    assert fsdp.parameters == total // 4
    assert ep.parameters == (total - experts) // 4 + experts // 2 // 2  # E=2 groups' experts sharded over 2 more
    assert ep.params == ep.parameters * 4 and ep.optimizer == ep.parameters * 8
    assert ep.activations == fsdp.activations
    # 16 experts, E=16 on 64 ranks: one expert per rank, sharded 4 ways along its hidden dimension (no rank empty)
    assert row(model, "fsdp", 64, 16).parameters == sum(w.numel // (64 if w.expert else 1) for w in model.weights if w.expert) + sum(
        -(-w.shape[0] // 64) * (w.numel // w.shape[0]) for w in model.weights if not w.expert
    )


def test_hsdp_shards_over_one_replica(tiny):
    recipe, model = tiny
    fsdp, ep = plan(recipe, 8, expert_parallel=2, strategy="fsdp", model=model, replicate=2)
    on_four = plan(recipe, 4, expert_parallel=2, strategy="fsdp", model=model)
    assert (fsdp.strategy, ep.strategy) == ("HSDP", "HSDP+EP")
    assert (fsdp.parameters, ep.parameters) == (on_four[0].parameters, on_four[1].parameters)
    assert plan(recipe, 8, model=model, replicate=2)[0].strategy == "HSDP"  # no DDP row: HSDP is fsdp


def test_gradient_sync_step_keeps_every_unsharded_gradient_between_micro_batches(tiny):
    recipe, model = tiny
    sizes = bytes_per_parameter("32-true", False)
    block = max(sum(w.numel for w in model.weights if w.unit == str(i)) for i in range(len(model.weights)))
    everything = sum(w.numel for w in model.weights)

    def copies(sync: str, accumulation: int) -> int:
        return copies_bytes(model.weights, sizes, "32-true", "fsdp", 4, 1, accumulation=accumulation, gradient_sync=sync)

    assert copies("step", 4) - copies("micro_batch", 4) == (everything - block) * 4
    assert copies("step", 1) == copies("micro_batch", 1)  # one micro-batch: nothing kept
    stepped = load_recipe(TINY, ["pretrain.global_batch_size=64", "pretrain.micro_batch_size=4"])
    assert planned_model(stepped).accumulation(4) == 4
    per_micro = load_recipe(TINY, ["pretrain.global_batch_size=64", "pretrain.micro_batch_size=4", "pretrain.gradient_sync=micro_batch"])
    assert plan(stepped, 4)[1].copies - plan(per_micro, 4)[1].copies == (everything - block) * 4


def test_fp8_copies_are_the_whole_gathered_model_on_every_rank():
    """Each rank quantises the weights it gathers and keeps them for the backward: the whole model's block weights
    (its own experts' under EP), whatever the number of shards."""
    recipe = load_recipe(RECIPES / "v2-lite.yaml", ["pretrain.precision=fp8-blockwise"])
    model = planned_model(recipe)
    fp8_weights = sum(w.numel for w in model.weights if w.fp8)
    own_experts = sum(w.numel // 8 if w.expert else w.numel for w in model.weights if w.fp8)
    for devices in (8, 64):
        plain = copies_bytes(model.weights, bytes_per_parameter("bf16-mixed", False), "bf16-mixed", "fsdp", devices, 1)
        fp8 = copies_bytes(model.weights, bytes_per_parameter("fp8-blockwise", False), "fp8-blockwise", "fsdp", devices, 1)
        assert fp8 - plain == fp8_weights
        plain_ep = copies_bytes(model.weights, bytes_per_parameter("bf16-mixed", False), "bf16-mixed", "fsdp", devices, 8)
        fp8_ep = copies_bytes(model.weights, bytes_per_parameter("fp8-blockwise", False), "fp8-blockwise", "fsdp", devices, 8)
        assert fp8_ep - plain_ep == own_experts
    micro = load_recipe(RECIPES / "v2-lite.yaml", ["pretrain.precision=fp8-blockwise", "pretrain.gradient_sync=micro_batch"])
    fsdp = plan(micro, 8, strategy="fsdp", expert_parallel=1)[0]
    assert 72 * GiB < fsdp.total < 73 * GiB  # the figure by rule (the plan said 59.5 GiB before)


def test_bf16_moments_halve_the_optimizer_bytes(tiny):
    recipe, model = tiny
    fp32_moments = plan(recipe, 2, model=model)
    recipe16 = load_recipe(TINY, ["pretrain.optimizer_states_bf16=true"])
    bf16_moments = plan(recipe16, 2)
    for a, b in zip(fp32_moments, bf16_moments, strict=True):
        assert b.optimizer * 2 == a.optimizer
        assert (b.params, b.grads, b.activations) == (a.params, a.grads, a.activations)


def test_bytes_per_parameter_by_precision():
    fp32 = bytes_per_parameter("32-true", False)
    assert (fp32.weight, fp32.grad, fp32.optimizer, fp32.compute) == (4, 4, 8, 4)
    mixed = bytes_per_parameter("bf16-mixed", True)
    assert (mixed.weight, mixed.grad, mixed.optimizer, mixed.compute) == (4, 4, 4, 2)
    true16 = bytes_per_parameter("bf16-true", False)
    assert (true16.weight, true16.grad, true16.optimizer, true16.compute) == (2, 2, 4, 2)


def saved_for_backward(model: torch.nn.Module, ids: torch.Tensor, autocast: bool) -> tuple[int, int, int]:
    """Bytes autograd saves in one forward with labels (MTP included), by storage: activations, attention
    probabilities (the CPU's math SDPA kernel; flash does not save them) and copies of the parameters."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters()} | {
        tuple(p.transpose(-2, -1).shape) for p in model.parameters() if p.dim() >= 2
    }
    saved, keep = {}, []

    def pack(t):
        keep.append(t)  # no storage is freed and reused while counting
        key = t.untyped_storage().data_ptr()
        if key not in params:
            saved.setdefault(key, (tuple(t.shape), t.untyped_storage().nbytes()))
        return t

    T = ids.shape[1]
    with (
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        model(input_ids=ids, labels=ids, use_cache=False)
    copies = sum(n for shape, n in saved.values() if shape in shapes)
    probs = sum(n for shape, n in saved.values() if len(shape) == 4 and shape[-2:] == (T, T))
    return sum(n for shape, n in saved.values() if shape not in shapes) - probs, probs, copies


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # CPU autocast's RMSNorm
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_activation_estimate_tracks_what_autograd_saves(precision):
    """The estimate within 10% of the bytes torch's saved-tensor hooks see (tiny's shape, B·T = 200 so that no
    activation has a parameter's shape), and the DDP bf16 copies exactly: every matmul weight once."""
    recipe = load_recipe(TINY, ["tokenizer.vocab_size=1000", f"pretrain.precision={precision}"])
    model = planned_model(recipe)
    torch.manual_seed(0)
    network = DSV3ForCausalLM(model.config).train()
    ids = torch.randint(0, 1000, (2, 100))
    measured, probs, copies = saved_for_backward(network, ids, autocast=precision == "bf16-mixed")
    sizes = bytes_per_parameter(precision, False)
    transient = 2 * 4 * model.config.vocab_size * ids.numel()  # the backward's first gradients, not saved tensors
    estimate = activation_bytes(model.config, sizes.compute, sizes.weight, ids.numel()) - transient
    assert abs(estimate / measured - 1) < 0.10, (estimate, measured)
    assert probs > 0  # the CPU kernel; a flash kernel would save the log-sum-exp instead
    assert copies == copies_bytes(model.weights, sizes, precision, "ddp", 1, 1)
    assert (copies > 0) == (precision == "bf16-mixed")


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_saves_what_the_estimate_says(mode):
    """What checkpointing takes off the forward's saved tensors (torch's saved-tensor hooks) within 5% of what the
    estimate takes off (its recomputation peak aside: that lives in the backward, one block at a time)."""
    ids = torch.randint(0, 1000, (2, 100), generator=torch.Generator().manual_seed(0))
    saved, estimated = {}, {}
    for m in ("none", mode):
        recipe = load_recipe(TINY, ["tokenizer.vocab_size=1000", f"pretrain.activation_checkpointing={m}"])
        model = planned_model(recipe)
        torch.manual_seed(0)
        network = DSV3ForCausalLM(model.config).train()
        checkpoint_blocks(network, m, model.activation_checkpointing_every)
        saved[m], _, _ = saved_for_backward(network, ids, autocast=False)  # the CPU's attention probabilities aside
        chosen = checkpointed_blocks(model)
        per = activation_bytes_per_token(model.config, 4, 4)
        kinds = ["dense layer"] * model.config.first_k_dense_replace + ["MoE layer"] * 10
        peak = max((per[kinds[i]] for i in chosen), default=0) * ids.numel()
        estimated[m] = activation_bytes(model.config, 4, 4, ids.numel(), chosen) - peak
    assert saved[mode] < saved["none"]
    reduction, estimated_reduction = saved["none"] - saved[mode], estimated["none"] - estimated[mode]
    assert abs(estimated_reduction / reduction - 1) < 0.05, (estimated_reduction, reduction)


def test_deepseek_v3_plans_with_any_pretrain_override(capsys):
    main(["plan", str(RECIPES / "deepseek-v3.yaml"), "--devices", "2048", "--expert-parallel", "64",
          "--set", "pretrain.precision=bf16-mixed", "--set", "pretrain.activation_checkpointing=full"])  # fmt: skip
    out = capsys.readouterr().out
    assert "precision bf16-mixed" in out and "activation_checkpointing full" in out and "\n| FSDP+EP | 2048 | 64 |" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--devices", "6", "--expert-parallel", "3"], "pretrain.expert_parallel / --expert-parallel: 3 must divide model.n_routed_experts (16)"),
        (["--devices", "2", "--expert-parallel", "4"], "pretrain.expert_parallel / --expert-parallel: 4 is larger than --devices (2)"),
        (["--devices", "0"], "--devices: must be at least 1 (got 0)"),
        (["--devices", "6", "--expert-parallel", "4"], "pretrain.expert_parallel / --expert-parallel: 4 must divide --devices (6)"),
        (["--devices", "4", "--expert-parallel", "2", "--strategy", "ddp"], "expert parallelism runs under strategy fsdp"),
        (["--devices", "1", "--strategy", "fsdp"], "--strategy: fsdp shards over several devices"),
        (["--devices", "6", "--fsdp-replicate", "4"], "pretrain.fsdp_replicate / --fsdp-replicate: 4 must divide --devices (6)"),
        (["--devices", "8", "--fsdp-replicate", "2", "--expert-parallel", "8"], "8 is larger than --devices (8) / --fsdp-replicate (2)"),
        (["--devices", "4", "--fsdp-replicate", "2", "--strategy", "ddp"], "HSDP replicates a sharded model"),
    ],
)
def test_bad_layouts_give_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", str(TINY), *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("dsv3: error: ") and message in err and err.count("\n") == 1, err


def test_a_recipe_without_a_model_section(tmp_path, capsys):
    path = tmp_path / "bare.yaml"
    path.write_text("name: bare\n")
    with pytest.raises(ValueError, match=r"^model: the recipe has no model section"):
        plan(load_recipe(path), 1)
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", str(path), "--devices", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("dsv3: error: model:") and err.count("\n") == 1


def test_cli_prints_the_table(capsys):
    main(["plan", str(RECIPES / "small.yaml"), "--devices", "8"])
    out = capsys.readouterr().out
    assert "| strategy | devices | E | params GiB | grads GiB | optimizer GiB | copies GiB | activations GiB | total GiB |" in out
    assert "\n| DDP | 8 | 1 |" in out and "\n| FSDP | 8 | 1 |" in out
    assert "vocabulary 32768 from tokenizer.vocab_size" in out
    assert "fits on one 80 GiB GPU: DDP yes, FSDP yes" in out


def test_v2_lite_is_the_16b_model():
    """recipes/v2-lite.yaml as its header states: 15.7B total (DeepSeek-V2-Lite's), 2.66B active with embedding and
    head, 2.45B without the embedding; DDP does not fit 80 GiB, FSDP+EP on 8 GPUs does; plain FSDP does with its
    gradients reduced after every micro-batch, not with 12 micro-batches' unsharded gradients kept."""
    recipe = load_recipe(RECIPES / "v2-lite.yaml")
    model = planned_model(recipe)
    counts = count_parameters(model.config)
    assert abs(counts["total"] / 15.7e9 - 1) < 0.001
    assert abs(counts["active"] / 2.66e9 - 1) < 0.002
    embedding = model.config.vocab_size * model.config.hidden_size
    assert abs((counts["active"] - embedding) / 2.45e9 - 1) < 0.002
    ddp, fsdp, ep = plan(recipe, 8, expert_parallel=8, model=model)
    assert ddp.total > 80 * GiB and fsdp.total > 80 * GiB and ep.total < 80 * GiB
    assert plan(load_recipe(RECIPES / "v2-lite.yaml", ["pretrain.gradient_sync=micro_batch"]), 8)[1].total < 80 * GiB
    assert fewest_devices(model, "ddp", 1, 80 * GiB) is None
    assert fewest_devices(model, "fsdp", 8, 80 * GiB) == 8
