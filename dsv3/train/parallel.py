"""Scaling out on PyTorch's own engine: FSDP2 (`fully_shard`) per block and at the root, and expert parallelism for
the routed experts — how torchtitan and Megatron train DeepSeek-V3, composed here by Lightning's
ModelParallelStrategy through `CausalLMTraining.configure_model`.

Expert parallelism (`expert_parallel: E`): the ranks form a (W/E, E) grid; each row is an expert-parallel group
whose E ranks hold n_routed_experts/E experts each of every MoE layer (a DTensor sharded along the experts), and
the W/E rows hold the same experts (replicas). A token goes to the rank of each expert it is routed to with
`all_to_all_single` (uneven splits: no capacity factor, no token dropped), the rank runs its experts as one grouped
GEMM over what it received, and the results come back the same way to be combined with the gate weights. The
router, shared experts, attention and everything else stay sharded by FSDP2 over all W ranks. An expert's gradient
then sums the losses of its group's E ranks; `sync_expert_gradients` adds the replicas' and divides by W, which is
what FSDP2 does for every other parameter (the mean of the ranks' losses).

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
from torch.distributed.tensor import DTensor, Replicate, Shard

from dsv3.fp8.convert import FP8GroupedExperts
from dsv3.fp8.linear import fp8_grouped_mm
from dsv3.model.moe import GroupedExperts, MoE


class ExpertParallel(nn.Module):
    """The routed experts of one MoE layer split over an expert-parallel group; same call as GroupedExperts:
    (x_sorted (N, C) rows sorted by expert, counts (E,) rows per expert) -> (N, C), the rows in the same order.

    `gate_up_proj` and `down_proj` keep GroupedExperts' names and global shapes as DTensors sharded along the experts
    (so checkpoints and state dicts are those of the unsplit model); each rank computes with its local slice, in FP8
    when the experts were converted (dsv3.fp8) before being split."""

    def __init__(self, experts: GroupedExperts, mesh: DeviceMesh):
        super().__init__()
        self.mesh, self.group = mesh, mesh.get_group("ep")
        self.fp8 = (experts.backend, experts.scaling) if isinstance(experts, FP8GroupedExperts) else None
        self.ep = mesh.size(mesh.mesh_dim_names.index("ep"))
        self.n_experts = experts.gate_up_proj.shape[0]
        placements = [Replicate(), Shard(0)]  # (replica, ep)
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name).detach()
            local = full.chunk(self.ep, dim=0)[mesh.get_local_rank("ep")].clone()
            setattr(self, name, nn.Parameter(DTensor.from_local(local, mesh, placements, run_check=False)))

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


def expert_mesh(world: int, expert_parallel: int, device_type: str) -> DeviceMesh:
    """The (replica, ep) grid of the ranks: consecutive ranks share an expert-parallel group."""
    return init_device_mesh(device_type, (world // expert_parallel, expert_parallel), mesh_dim_names=("replica", "ep"))


def parallelize(
    model: nn.Module, dp_mesh: DeviceMesh, expert_parallel: int = 1, mixed_precision: bool = False
) -> nn.Module:
    """In place: routed experts split over `expert_parallel` ranks (if > 1), then FSDP2 on every decoder block,
    every MTP module and the root (embedding, head, final norm), over `dp_mesh`; the expert DTensors are left to
    `sync_expert_gradients`. Returns the model."""
    ignored: set[nn.Parameter] = set()
    if expert_parallel > 1:
        mesh = expert_mesh(dp_mesh.size(), expert_parallel, dp_mesh.device_type)
        for moe in (m for m in model.modules() if isinstance(m, MoE)):
            moe.experts = ExpertParallel(moe.experts, mesh)
            ignored |= set(moe.experts.parameters())
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    for layer in model.model.layers:
        fully_shard(layer, mesh=dp_mesh, mp_policy=policy, ignored_params=ignored & set(layer.parameters()))
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, ignored_params=ignored)
    return model


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, ExpertParallel) for p in m.parameters()]


@torch.no_grad()
def sync_expert_gradients(model: nn.Module, world: int) -> None:
    """Each expert's gradient summed the losses of its group's ranks: add the replicas' and divide by the world
    size, as FSDP2 averages every other gradient over the ranks."""
    for param in expert_parameters(model):
        if param.grad is None:
            continue
        local = param.grad.to_local()
        dist.all_reduce(local, group=param.device_mesh.get_group("replica"))
        local.div_(world)


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
