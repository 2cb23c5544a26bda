"""Scaling out on PyTorch's own engine: FSDP2 (`fully_shard`) per block and at the root, HSDP as an option, and
expert parallelism for the routed experts — how torchtitan and Megatron train DeepSeek-V3, composed here by
Lightning's ModelParallelStrategy through `CausalLMTraining.configure_model`.

The W ranks form a grid (replicate R, shard W/R) for every parameter but the routed experts: `fully_shard` over
the shard dimension, replicated over R (HSDP when R > 1: all-gathers and reduce-scatters stay inside a group of
W/R ranks, one all-reduce across the groups).

Expert parallelism (`expert_parallel: E`): the shard dimension is split again into (W/(R·E), E); each group of E
consecutive ranks holds n_routed_experts/E experts each of every MoE layer (a DTensor sharded along the experts
over the 1-D "ep" mesh). A token goes to the rank of each expert it is routed to with `all_to_all_single` (uneven
splits: no capacity factor, no token dropped), the rank runs its experts as one grouped GEMM over what it
received, and the results come back the same way to be combined with the gate weights. The W/(R·E) ranks that
hold the same experts shard them further with `fully_shard` (torchtitan's dp_shard_mod_ep), HSDP across R.
An expert's gradient sums the losses of its group's E ranks; FSDP's reduce-scatter adds the other ranks' and
divides by W (`set_gradient_divide_factor`), the mean of the ranks' losses as for every other parameter.

Mixed precision on GPUs: bf16 parameters in the blocks' compute, fp32 gradient reductions (FSDP2's
MixedPrecisionPolicy); the fp32 router bias is a buffer and stays fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd  # as torchtitan dispatches
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from dsv3.fp8.convert import FP8GroupedExperts
from dsv3.fp8.linear import fp8_grouped_mm
from dsv3.model.moe import GroupedExperts, MoE


class ExpertParallel(nn.Module):
    """The routed experts of one MoE layer split over an expert-parallel group; same call as GroupedExperts:
    (x_sorted (N, C) rows sorted by expert, counts (E,) rows per expert) -> (N, C), the rows in the same order.

    `gate_up_proj` and `down_proj` keep GroupedExperts' names and global shapes as DTensors sharded along the experts
    (so checkpoints and state dicts are those of the unsplit model); each rank computes with its local slice, in FP8
    when the experts were converted (dsv3.fp8) before being split."""

    def __init__(self, experts: GroupedExperts, ep_mesh: DeviceMesh):
        super().__init__()
        self.group = ep_mesh.get_group()
        self.fp8 = (experts.backend, experts.scaling) if isinstance(experts, FP8GroupedExperts) else None
        self.ep = ep_mesh.size()
        self.n_experts = experts.gate_up_proj.shape[0]
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name).detach()
            local = full.chunk(self.ep, dim=0)[ep_mesh.get_local_rank()].clone()
            setattr(self, name, nn.Parameter(DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)))

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        local_experts = self.n_experts // self.ep
        send = counts.view(self.ep, local_experts)  # rows this rank sends to each rank, per expert there
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # rows each rank sends here, per local expert
        send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        # (R, C): the rows this rank's experts get, by source rank, then by local expert
        received = all_to_all_single_autograd(x_sorted, recv_splits, send_splits, self.group)
        expert_of = torch.repeat_interleave(
            torch.arange(local_experts, device=counts.device).repeat(self.ep), recv.reshape(-1)
        )
        order = expert_of.argsort(stable=True)  # by local expert, then by source rank
        offsets = recv.sum(0).cumsum(0).to(torch.int32)
        gate_up, down = (w.to_local().to(x_sorted.dtype) for w in (self.gate_up_proj, self.down_proj))
        gate, up = self.grouped_matmul(received.index_select(0, order), gate_up, offsets).chunk(2, dim=-1)
        y = self.grouped_matmul(nn.functional.silu(gate) * up, down, offsets)
        y = y.index_select(0, order.argsort())  # back to (source rank, local expert) order
        return all_to_all_single_autograd(y, send_splits, recv_splits, self.group)

    def grouped_matmul(self, x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The local experts' GEMM as GroupedExperts (or FP8GroupedExperts) runs it."""
        if self.fp8 is None:
            return GroupedExperts.grouped_matmul(x, weight, offsets)
        return fp8_grouped_mm(x, weight.transpose(-2, -1), offsets, *self.fp8)


def meshes(world: int, replicate: int, expert_parallel: int, device_type: str) -> tuple[DeviceMesh, DeviceMesh]:
    """The dense grid (replicate, shard) = (R, W/R) and the expert grid (replicate, shard, ep) = (R, W/(R·E), E)
    of the same ranks: consecutive ranks share a shard group, and within it an expert-parallel group."""
    dense = init_device_mesh(device_type, (replicate, world // replicate), mesh_dim_names=("replicate", "shard"))
    experts = init_device_mesh(
        device_type, (replicate, world // (replicate * expert_parallel), expert_parallel),
        mesh_dim_names=("replicate", "shard", "ep"),
    )  # fmt: skip
    return dense, experts


def data_parallel(mesh: DeviceMesh) -> DeviceMesh:
    """What `fully_shard` gets: the shard dimension alone, or (replicate, shard) for HSDP."""
    return mesh["replicate", "shard"] if mesh["replicate"].size() > 1 else mesh["shard"]


def parallelize(
    model: nn.Module, world: int, device_type: str, expert_parallel: int = 1, replicate: int = 1,
    mixed_precision: bool = False,
) -> nn.Module:
    """In place, on `world` ranks: routed experts split over `expert_parallel` ranks (if > 1) and sharded over the
    ranks holding the same ones, then FSDP2 on every decoder block, every MTP module and the root (embedding,
    head, final norm), HSDP with `replicate` > 1 (see the module docstring). Returns the model."""
    dense_mesh, expert_grid = meshes(world, replicate, expert_parallel, device_type)
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    if expert_parallel > 1:
        local_experts = model.config.n_routed_experts // expert_parallel
        shard = expert_grid["shard"].size()
        placement = Shard(1) if shard > local_experts else Shard(0)  # torchtitan's rule: no rank left empty
        for moe in (m for m in model.modules() if isinstance(m, MoE)):
            moe.experts = ExpertParallel(moe.experts, expert_grid["ep"])
            fully_shard(moe.experts, mesh=data_parallel(expert_grid), mp_policy=policy, shard_placement_fn=lambda _: placement)
            moe.experts.set_gradient_divide_factor(world)  # FSDP's own factor would be the shard group's size
            # SUM, then divide (gloo has no PREMUL_SUM); not for a one-rank shard group, which torch 2.13 divides twice
            moe.experts.set_force_sum_reduction_for_comms(expert_grid["shard"].size() > 1)
    for layer in model.model.layers:
        fully_shard(layer, mesh=data_parallel(dense_mesh), mp_policy=policy)
    fully_shard(model, mesh=data_parallel(dense_mesh), mp_policy=policy)
    return model


@torch.no_grad()
def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for parameters that live on different meshes (FSDP shards, expert shards):
    the norm of each mesh's gradients, combined, then one clip factor for all."""
    grads_by_mesh: dict[tuple, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else (None, None)
            grads_by_mesh.setdefault(key, []).append(p.grad)
    norms = []
    for grads in grads_by_mesh.values():
        norm = torch.nn.utils.get_total_norm(grads)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    coefficient = min(max_norm / (float(total) + 1e-6), 1.0)  # as clip_grad_norm_; a float multiplies any DTensor
    for grads in grads_by_mesh.values():
        for grad in grads:
            grad.mul_(coefficient)
    return total
