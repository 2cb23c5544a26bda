"""Training under every layout of dsv3.train.parallel equals one process (gloo, forked ranks, seconds): a toy model
with MTP and the balance loss, 3 AdamW steps of 2 micro-batches each, clipped, per-rank losses and final weights
compared with one process that computes every rank's rows.

- 2 ranks, EP 2: gradients reduced once per optimizer step (`gradient_sync: step`, FSDP2's
  set_requires_gradient_sync) and after every micro-batch give the same losses and weights.
- 2 ranks, FP8 (blockwise, emulated GEMMs, bf16 autocast: the FP8 plugin's step) without and with EP 2.
- 4 ranks, EP 2: the experts are also sharded by FSDP over the 2 ranks holding the same ones (torchtitan's
  dp_shard_mod_ep); HSDP (2 replicas × 2 shards) with EP 2 and full activation checkpointing; HSDP without EP,
  selective checkpointing, micro-batch sync.

Measured worst differences from one process (fp32, 2-core CPU, torch 2.13): losses ≤ 4.8e-7 in every layout;
weights after 3 steps ≤ 2.8e-6 (2 ranks), 9.8e-7 (experts sharded), 1.3e-6 (HSDP + EP), 1.8e-6 (HSDP); step vs
micro_batch sync: losses 4.8e-7, weights 2.7e-6. The tests allow 5e-6: float reassociation of the reductions, amplified by AdamW's
first steps at LR 1e-2 (a gradient entry near zero is normalised to a step of ~LR).

FP8 + FSDP without EP: 1.6e-7 (weights), losses equal: each rank quantises exactly the tiles one process does for
those rows. FP8 + FSDP + EP: losses 3.4e-3, weights 3.4e-2 (about 3 LR-sized Adam steps of entries whose gradient
flips sign), bounded here at 5e-3 and 5e-2. The cause is EP's regrouping, not the reductions: an expert's weight
gradient quantises its tokens in 128-token tiles starting at the expert's first token (dsv3.fp8.linear), and under
EP those tokens are both ranks' (rank 0's then rank 1's, 16 + 16 here, in one tile), while one process computing
each rank's rows in its own forward tiles each rank's tokens apart: other per-tile scales, other FP8 values. No
layout without EP shows it, and only the FP8 layout with EP does. It is the FP8 noise of the weight gradient
(E4M3 rounds to ~2^-4 relative), not an error of the layout; issue 22's 2.8e-4 gap in the final validation loss
(smoke, 2 processes, FP8 + FSDP + EP) is consistent with it but was not re-measured here.
"""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from dsv3.fp8 import convert_to_fp8
from dsv3.model import DSV3ForCausalLM
from dsv3.train.parallel import clip_grad_norm, parallelize
from dsv3.train.recompute import checkpoint_blocks
from tests.toy_model import toy_config

STEPS, MICRO, T = 3, 2, 16
LM = dict(vocab_size=64, num_nextn_predict_layers=1, aux_loss_alpha=0.01, max_position_embeddings=32,
          n_routed_experts=8, num_experts_per_tok=3, n_group=1, topk_group=1)  # fmt: skip
MAX_NORM = 0.5
TOLERANCE = 5e-6
FP8_EP_BOUND = (5e-3, 5e-2)  # losses, weights: measured 3.4e-3 and 3.4e-2 (see the module docstring)
LAYOUTS = {
    2: {
        "EP 2, gradient_sync step": dict(expert_parallel=2),
        "EP 2, gradient_sync micro_batch": dict(expert_parallel=2, gradient_sync="micro_batch"),
        "FP8": dict(fp8=True),
        "FP8, EP 2": dict(expert_parallel=2, fp8=True),
    },
    4: {
        "EP 2, experts sharded over 2": dict(expert_parallel=2),
        "HSDP 2x2, EP 2, full checkpointing": dict(expert_parallel=2, replicate=2, checkpointing="full"),
        "HSDP 2x2, selective checkpointing, micro_batch": dict(replicate=2, checkpointing="selective", gradient_sync="micro_batch"),
    },
}  # fmt: skip


def batches(world: int) -> torch.Tensor:
    """(STEPS, MICRO, world, T): one row per rank per micro-batch."""
    return torch.randint(0, 64, (STEPS, MICRO, world, T), generator=torch.Generator().manual_seed(2))


def new_model(fp8: bool = False) -> DSV3ForCausalLM:
    torch.manual_seed(0)
    model = DSV3ForCausalLM(toy_config(**LM))
    return convert_to_fp8(model, "emulated") if fp8 else model  # before sharding, as CausalLMTraining does


def full(param: torch.Tensor) -> torch.Tensor:
    return param.detach().full_tensor() if isinstance(param, DTensor) else param.detach()


def train(model, data: torch.Tensor, ranks: list[int], gradient_sync: str = "step", fp8: bool = False):
    """AdamW steps over `data`; this process computes the rows of `ranks` (all of them: one process) and their
    mean loss. Returns the per-rank losses (STEPS, MICRO, len(ranks)) and the final full weights."""
    sharded = isinstance(model, FSDPModule)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = torch.zeros(STEPS, MICRO, len(ranks))
    for step, micro_batches in enumerate(data):
        for i, rows in enumerate(micro_batches):
            if sharded:
                model.set_requires_gradient_sync(gradient_sync == "micro_batch" or i == MICRO - 1)
            total = 0.0
            for j, rank in enumerate(ranks):
                ids = rows[rank : rank + 1]
                with torch.autocast("cpu", torch.bfloat16, enabled=fp8):  # as the FP8 precision plugin runs the step
                    out = model(input_ids=ids, labels=ids, use_cache=False)
                loss = out.loss + 0.3 * out.mtp_losses.mean() + out.balance_loss
                losses[step, i, j] = loss.detach()
                total = total + loss
            (total / (len(ranks) * MICRO)).backward()
        if sharded:
            clip_grad_norm(list(model.parameters()), MAX_NORM)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, {name: full(p) for name, p in model.named_parameters()}


def _rank(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = {}
        for name, layout in LAYOUTS[world].items():
            fp8 = layout.get("fp8", False)
            model = new_model(fp8)
            checkpoint_blocks(model, layout.get("checkpointing", "none"), every=2)
            parallelize(model, world, "cpu", layout.get("expert_parallel", 1), layout.get("replicate", 1))
            experts = model.model.layers[1].mlp.experts.gate_up_proj  # first MoE layer
            losses, weights = train(model, batches(world), [rank], layout.get("gradient_sync", "step"), fp8)
            results[name] = {"losses": losses, "weights": weights, "expert_shard": tuple(experts.to_local().shape)}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, folder: Path) -> list[dict]:
    # forked, not spawned: a spawned process imports torch and transformers again (~10 s on 2 cores)
    mp.start_processes(_rank, args=(world, str(folder / "store"), str(folder)), nprocs=world, join=True, start_method="fork")
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, tuple[list[dict], tuple]]:
    """Per world size: each rank's results, and one process's (losses, weights)."""
    return {
        world: (
            run_ranks(world, tmp_path_factory.mktemp(f"ranks{world}")),
            {fp8: train(new_model(fp8), batches(world), list(range(world)), fp8=fp8) for fp8 in (False, True)},
        )
        for world in LAYOUTS
    }


def test_every_layout_trains_as_one_process(runs):
    for world, (ranks, one_process) in runs.items():
        for name, layout in LAYOUTS[world].items():
            losses, weights = one_process[layout.get("fp8", False)]
            loss_tolerance, weight_tolerance = FP8_EP_BOUND if name == "FP8, EP 2" else (TOLERANCE, TOLERANCE)
            for rank, result in enumerate(ranks):
                ours = result[name]
                worst_loss = float((ours["losses"][..., 0] - losses[..., rank]).abs().max())
                assert worst_loss <= loss_tolerance, f"{name}: losses differ by {worst_loss}"
                worst = max(float((ours["weights"][k] - weights[k]).abs().max()) for k in weights)
                assert worst <= weight_tolerance, f"{name}: weights differ by {worst}"


def test_gradient_sync_step_and_micro_batch_agree(runs):
    for result in runs[2][0]:
        step, micro = result["EP 2, gradient_sync step"], result["EP 2, gradient_sync micro_batch"]
        assert float((step["losses"] - micro["losses"]).abs().max()) <= TOLERANCE
        assert max(float((step["weights"][k] - micro["weights"][k]).abs().max()) for k in step["weights"]) <= TOLERANCE


def test_experts_are_sharded_beside_expert_parallelism(runs):
    hidden, inner = 32, 2 * 16  # gate_up_proj (experts, C, 2·I)
    for result in runs[4][0]:  # 8 experts / EP 2 = 4 per rank, FSDP-sharded over the 2 ranks holding them
        assert result["EP 2, experts sharded over 2"]["expert_shard"] == (2, hidden, inner)
        assert result["HSDP 2x2, EP 2, full checkpointing"]["expert_shard"] == (4, hidden, inner)  # replicated over 2
    for result in runs[2][0]:  # EP 2 on 2 ranks: nothing left to shard the experts over
        assert result["EP 2, gradient_sync step"]["expert_shard"] == (4, hidden, inner)
