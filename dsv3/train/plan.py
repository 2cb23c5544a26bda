"""Memory plan (`dsv3 plan`): the bytes one device needs to pretrain a recipe's model under DDP, FSDP2 and FSDP2 with
expert parallelism, computed before anyone rents a GPU.

Parameters are exact: the model is built on the meta device (no memory, no initialisation) and every tensor is
counted, grouped as embedding and head, attention, dense FFN, shared experts, routed experts, norms and routers, and
the MTP modules. The rest follows from the layouts below and is an estimate wherever it says so.

Bytes per parameter (`pretrain.precision`, `pretrain.optimizer_states_bf16`):

    precision        weights                 gradients   AdamW moments (bf16 moments)   compute dtype
    32-true          4 (fp32)                4           8  (4)                         fp32
    bf16-mixed       4 (fp32 master)         4           8  (4)                         bf16 (autocast)
    fp8-blockwise    4 (fp32 master)         4           8  (4)                         bf16; block GEMMs in fp8
    fp8-tensorwise   as fp8-blockwise (one scale per tensor instead of per tile and block)
    bf16-true        2 (bf16)                2           4  (4)                         bf16

Layouts, on N devices (`--devices`, all ranks of all nodes) with E expert-parallel ranks (`--expert-parallel`) and
R HSDP replicas (`--fsdp-replicate`, default pretrain.fsdp_replicate):

- DDP: every rank holds the whole model, its gradients and its optimizer state.
- FSDP (FSDP2, `dsv3.train.parallel.parallelize`): `fully_shard` on every decoder block, every MTP module and the
  root (embedding, final norm, head); each parameter is split along its first dimension into S = N/R shards (padded
  to a multiple of S, as FSDP2 does), and so are its gradient and its AdamW moments; R > 1 (HSDP) keeps R copies.
- FSDP+EP: the routed experts of every MoE layer (the MTP modules' too) are split over E ranks: each rank's
  n_routed_experts/E experts are sharded again over the S/E ranks that hold the same ones (torchtitan's
  dp_shard_mod_ep: along the experts, or along their hidden dimension when there are fewer experts than ranks);
  everything else is FSDP-sharded over S ranks.

Not modelled: pipeline parallelism (the paper's 16 stages with DualPipe: this code has none, so a stage's share of
the layers is not divided out), tensor parallelism, ZeRO-1 (the paper replicates weights and gradients across its
data-parallel ranks and shards only the optimizer state).

The "copies" column: per-parameter memory besides the master weights, gradients and moments, alive at the peak
(the end of the forward, when every activation is saved):

- DDP: the gradient buckets (torch's DDP copies every gradient into its buckets unless gradient_as_bucket_view,
  which Lightning leaves off: gradient bytes again, N > 1 only); under bf16-mixed the bf16 copy of every matmul
  weight (linear layers, experts, head; not the embedding, the norms or the fp32 router), which autograd saves for
  the backward, so "transient" in name only: it lives from a layer's forward to its backward, the whole model's
  worth at the peak; under fp8-blockwise the FP8 copy of every block weight (1 byte; saved for the backward the same
  way) and the bf16 head.
- FSDP: the gathered units in the compute dtype (FSDP2's MixedPrecisionPolicy: bf16 parameters under bf16-mixed
  and fp8) — the root, which FSDP2 keeps gathered from forward to backward, and two blocks (the one computing and
  the one prefetched), a block's experts being the rank's n_routed_experts/E under EP — and one block's unsharded
  gradient in fp32 before its reduce-scatter; under fp8-blockwise the FP8 copy of every block weight, quantised
  from the gathered weights and saved for the backward: the whole model's worth on every rank whatever N (under EP,
  of the rank's own experts). With `gradient_sync: step` and more than one micro-batch per step, FSDP2 keeps every
  unit's unsharded gradient (fp32, the reduce dtype) from one micro-batch to the next: the whole gathered model's
  worth, 4 bytes per parameter, instead of one block's (`micro_batch` reduce-scatters after each micro-batch).

Activations: an estimate, `activation_bytes_per_token`, times micro_batch_size × seq_len tokens; the same on
every strategy except that FSDP's bf16 parameters make the residual stream bf16 (fp32 under autocast otherwise,
the embedding's output being fp32). Expert parallelism moves tokens to their experts' ranks: with balanced loads
each rank computes as many expert rows as without it; an unbalanced step (MaxVio > 0) needs more on the busiest.
Activation checkpointing (`pretrain.activation_checkpointing`, dsv3.train.recompute): a checkpointed block keeps
only its input (the residual stream), and the backward holds one checkpointed block's activations at a time, the
largest counted.

Not counted: the CUDA context and NCCL buffers (a few GiB), allocator fragmentation, expert-parallel dispatch
buffers, the router bias and load buffers (8 bytes per expert per MoE layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dsv3.config import PretrainSection, Recipe
from dsv3.model import DSV3Config, DSV3ForCausalLM
from dsv3.model.moe import GroupedExperts, Router
from dsv3.train.recompute import checkpointed_block_indices

GiB = 1024**3

GROUPS = (
    "embedding and head", "attention", "dense FFN", "shared experts", "routed experts", "norms and routers", "MTP modules",
)  # fmt: skip


@dataclass(frozen=True)
class Weight:
    """One parameter of the model: its shape, its group (GROUPS), the FSDP unit it belongs to ("root" or the index
    of its block in model.layers), whether it is a routed expert's, whether a GEMM reads it in the compute dtype
    (linear layers, experts, head: `matmul`), and whether it runs in FP8 under fp8-blockwise (the blocks' matmuls)."""

    shape: tuple[int, ...]
    group: str
    unit: str
    expert: bool
    matmul: bool
    fp8: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def gathered_numel(self, expert_parallel: int) -> int:
        """Elements a rank computes with: the whole tensor, or its n_routed_experts/E experts under EP."""
        return self.numel // expert_parallel if self.expert else self.numel

    def local_numel(self, strategy: str, devices: int, expert_parallel: int, replicate: int = 1) -> int:
        """Elements one rank holds: the whole tensor (DDP), or an FSDP2 shard over the S = devices/replicate ranks
        of a replica (the first dimension split into S parts, padded up); under EP a routed expert's n/E experts
        sharded over the S/E ranks holding the same ones (along the experts, or the next dimension when fewer)."""
        if strategy != "fsdp":
            return self.numel
        shard = devices // replicate
        shape, dim = list(self.shape), 0
        if self.expert and expert_parallel > 1:
            shape[0] //= expert_parallel
            shard //= expert_parallel
            dim = 1 if shard > shape[0] else 0  # dsv3.train.parallel's rule
        shape[dim] = math.ceil(shape[dim] / shard)
        return math.prod(shape)


@dataclass(frozen=True)
class BytesPerParameter:
    """Bytes per parameter of the master weight, its gradient and its AdamW moments; `compute`: bytes per value of
    the compute dtype (activations, gathered FSDP parameters, autocast copies)."""

    weight: int
    grad: int
    optimizer: int
    compute: int


@dataclass(frozen=True)
class Row:
    """One strategy's bytes per device: parameters, gradients, optimizer state, copies (see the module docstring)
    and activations (an estimate); `parameters` is the number of parameter elements one rank holds."""

    strategy: str
    devices: int
    expert_parallel: int
    parameters: int
    params: int
    grads: int
    optimizer: int
    copies: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.copies + self.activations


@dataclass(frozen=True)
class PlannedModel:
    """What a plan needs from a recipe: its model's config (with the vocabulary it was planned with and where that
    came from), its parameters, the pretraining settings read and whether they are the section's defaults."""

    config: DSV3Config
    vocab_source: str
    weights: tuple[Weight, ...]
    precision: str
    optimizer_states_bf16: bool
    micro_batch_size: int
    global_batch_size: int
    seq_len: int
    gradient_sync: str
    activation_checkpointing: str
    activation_checkpointing_every: int
    fsdp_replicate: int
    pretrain_defaults: bool

    def accumulation(self, devices: int) -> int:
        """Micro-batches per optimizer step on each of `devices` ranks."""
        return max(1, self.global_batch_size // (self.micro_batch_size * devices))


# ------------------------------------------------------------------------------------------------- the model


def planning_vocab_size(recipe: Recipe) -> tuple[int, str]:
    """The vocabulary the model is planned with and where it comes from: model.vocab_size when the recipe sets it,
    else the tokenizer's, as pretraining does (`model.vocab_size: null`; the tokenizer stage trains to
    tokenizer.vocab_size tokens, a section every recipe has, with a default)."""
    if recipe.model.vocab_size:
        return recipe.model.vocab_size, "model.vocab_size"
    return recipe.tokenizer.vocab_size, "tokenizer.vocab_size (model.vocab_size is null: the tokenizer's)"


def model_weights(config: DSV3Config) -> tuple[Weight, ...]:
    """Every parameter of DSV3ForCausalLM(config), built on the meta device, as a Weight."""
    with torch.device("meta"):
        model = DSV3ForCausalLM(config)
    n = config.num_hidden_layers
    weights = [
        Weight(tuple(model.model.embed_tokens.weight.shape), "embedding and head", "root", False, False, False),
        Weight(tuple(model.lm_head.weight.shape), "embedding and head", "root", False, True, False),
        Weight(tuple(model.model.norm.weight.shape), "norms and routers", "root", False, False, False),
    ]
    for index, layer in enumerate(model.model.layers):
        for name, param in layer.named_parameters():
            module = layer.get_submodule(name.rpartition(".")[0])
            matmul = isinstance(module, nn.Linear | GroupedExperts)
            group = "MTP modules" if index >= n else _group(name, module)
            expert = isinstance(module, GroupedExperts)
            weights.append(Weight(tuple(param.shape), group, str(index), expert, matmul, matmul))
    return tuple(weights)


def _group(name: str, module: nn.Module) -> str:
    """The group of a main decoder block's parameter from its name in the block and the module that owns it."""
    if isinstance(module, nn.RMSNorm | Router):
        return "norms and routers"
    if name.startswith("self_attn."):
        return "attention"
    if isinstance(module, GroupedExperts):
        return "routed experts"
    return "shared experts" if name.startswith("mlp.shared_experts.") else "dense FFN"


def parameter_groups(weights: tuple[Weight, ...]) -> dict[str, int]:
    """Parameter counts per group (GROUPS order); their sum is count_parameters' total plus its mtp."""
    counts = dict.fromkeys(GROUPS, 0)
    for w in weights:
        counts[w.group] += w.numel
    return counts


def planned_model(recipe: Recipe) -> PlannedModel:
    """The recipe's model and pretraining settings as the plan reads them; ValueError for a recipe without a model
    section. Without a pretrain section (recipes/deepseek-v3.yaml) the section's defaults are used."""
    if recipe.model is None:
        raise ValueError("model: the recipe has no model section; dsv3 plan needs one (see recipes/small.yaml)")
    vocab, source = planning_vocab_size(recipe)
    config = recipe.model.config(vocab, bos_token_id=None, eos_token_id=None)
    pretrain = recipe.pretrain

    def setting(name: str):
        return getattr(pretrain, name) if pretrain is not None else PretrainSection.model_fields[name].default

    return PlannedModel(
        config, source, model_weights(config), setting("precision"), setting("optimizer_states_bf16"),
        setting("micro_batch_size"), setting("global_batch_size"), recipe.data.seq_len, setting("gradient_sync"),
        setting("activation_checkpointing"), setting("activation_checkpointing_every"), setting("fsdp_replicate"),
        pretrain is None,
    )  # fmt: skip


# -------------------------------------------------------------------------------------------- bytes per value


def bytes_per_parameter(precision: str, optimizer_states_bf16: bool) -> BytesPerParameter:
    """The table of the module docstring: fp32 master weights and gradients except under bf16-true (bf16 weights,
    gradients and, like the weights, moments); AdamW's two moments in the parameters' dtype, or bf16 with
    optimizer_states_bf16 (dsv3.fp8.AdamWBF16Moments)."""
    weight = 2 if precision == "bf16-true" else 4
    compute = 4 if precision == "32-true" else 2
    return BytesPerParameter(weight, weight, 2 * (2 if optimizer_states_bf16 else weight), compute)


def activation_bytes_per_token(config: DSV3Config, compute: int, residual: int) -> dict[str, int]:
    """Bytes autograd keeps per token for the backward (an estimate), per part of the model: "dense layer", "MoE
    layer", "MTP module" (each MTP module's input projection and norms, its block being a MoE or dense layer as
    counted above) and "head" (one output head; the model has 1 + D).

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") count the tensors a
    layer saves for its backward; adapted here to MLA + DeepSeekMoE as this implementation runs them (checked
    against torch's saved-tensor hooks in tests/test_plan.py). c = `compute` bytes (4 fp32, 2 bf16), r = `residual`
    bytes (the residual stream and the norms: fp32 under autocast); casts = 2 when c != r (autocast casts a normed
    fp32 input once per projection reading it), else 1; H heads, C = hidden_size, K active of E routed experts:

        RMSNorm(d)          2·d·r                 its input and the normalised value
        attention (MLA)     norm(C) + C·c·casts   block input, normed input for W^DQ (or W^Q) and W^DKV
                            + norm(d'_q) + d'_q·c c_Q and W^UQ's input (when queries are compressed)
                            + norm(d_c) + d_c·c   the KV latent c_KV and W^UKV's input
                            + 2·H·(d_h + d_R)·c   q and k expanded per head
                            + 3·H·d_v·c + 4·H     v, the attention output (SDPA's and o_proj's contiguous input),
                                                  SDPA's log-sum-exp; no attention probabilities (flash/efficient
                                                  SDPA; the CPU's math kernel saves them: H·T·4 more)
        dense FFN           norm(C) + C·c·casts + 4·I·c      SwiGLU: W1 x, SiLU(W1 x), W3 x, their product
        MoE                 norm(C) + 4·(C + E) + 16·K       router: fp32 input and affinities, ids and gates
                            + C·c·2·(casts - 1) + 4·I_s·c    shared experts
                            + K·(C·(2c + r) + 4·I_m·c)       each routed copy: the expert's input, its output,
                                                             the gate-weighted output, its SwiGLU intermediates
        MTP module          2·norm(C) + 2·C·c                enorm, hnorm, M_k's input [Emb; h]
        head                norm(C) + C·c + 4·V              the head's input, fp32 log-probabilities for the CE
    """
    c, r = compute, residual
    casts = 2 if c != r else 1
    C, H, E, K = config.hidden_size, config.num_attention_heads, config.n_routed_experts, config.num_experts_per_tok

    def norm(d: int) -> int:
        return 2 * d * r

    q = norm(config.q_lora_rank) + config.q_lora_rank * c if config.q_lora_rank else 0
    attention = (
        norm(C) + C * c * casts + q
        + norm(config.kv_lora_rank) + config.kv_lora_rank * c
        + 2 * H * (config.qk_nope_head_dim + config.qk_rope_head_dim) * c
        + 3 * H * config.v_head_dim * c + 4 * H
    )  # fmt: skip
    dense = norm(C) + C * c * casts + 4 * config.intermediate_size * c
    shared = config.moe_intermediate_size * config.n_shared_experts
    moe = (
        norm(C) + 4 * (C + E) + 16 * K
        + C * c * 2 * (casts - 1) + 4 * shared * c
        + K * (C * (2 * c + r) + 4 * config.moe_intermediate_size * c)
    )  # fmt: skip
    return {
        "dense layer": attention + dense,
        "MoE layer": attention + moe,
        "MTP module": 2 * norm(C) + 2 * C * c,
        "head": norm(C) + C * c + 4 * config.vocab_size,
    }


def activation_bytes(
    config: DSV3Config, compute: int, residual: int, tokens: int, checkpointed: frozenset[int] = frozenset()
) -> int:
    """Activations of one micro-batch of `tokens` tokens (micro_batch_size × seq_len), an estimate: the per-token
    bytes of activation_bytes_per_token summed over the blocks (the dense and MoE layers, then the D MTP modules'
    blocks, each of the kind its index gives), the MTP modules' input projections and the 1 + D heads, plus two fp32
    logit-sized tensors (the gradient of the log-probabilities and of the logits) alive when the backward starts.
    `checkpointed`: indices of blocks that keep only their input (hidden_size values in the residual dtype), plus,
    once, the largest of them recomputed in the backward."""
    per = activation_bytes_per_token(config, compute, residual)
    n, dense_layers, depth = config.num_hidden_layers, config.first_k_dense_replace, config.num_nextn_predict_layers
    blocks = [per["MoE layer"] if i >= dense_layers else per["dense layer"] for i in range(n + depth)]
    recomputed = [blocks[i] for i in checkpointed]
    per_token = (
        sum(b for i, b in enumerate(blocks) if i not in checkpointed)
        + len(recomputed) * config.hidden_size * residual + max(recomputed, default=0)
        + depth * per["MTP module"] + (1 + depth) * per["head"] + 2 * 4 * config.vocab_size
    )  # fmt: skip
    return int(per_token * tokens)


# ---------------------------------------------------------------------------------------------- per device


def copies_bytes(
    weights: tuple[Weight, ...], sizes: BytesPerParameter, precision: str, strategy: str, devices: int,
    expert_parallel: int, replicate: int = 1, accumulation: int = 1, gradient_sync: str = "step",
) -> int:
    """The "copies" column of the module docstring: DDP's gradient buckets and autocast / FP8 weight copies saved for
    the backward; FSDP's gathered root and two gathered blocks in the compute dtype, one block's fp32 unsharded
    gradient (every unit's when gradients are reduced once per step over several micro-batches) and the FP8 copy of
    every gathered block weight. `replicate` (HSDP) changes no gathered size."""
    in_fp8 = precision.startswith("fp8-")
    mixed = precision == "bf16-mixed" or in_fp8
    fp8_copies = sum(w.gathered_numel(expert_parallel) for w in weights if w.fp8) if in_fp8 else 0  # 1 byte each
    if strategy == "ddp":
        buckets = sum(w.numel for w in weights) * sizes.grad if devices > 1 else 0
        cast = sum(w.numel for w in weights if w.matmul and not (in_fp8 and w.fp8)) if mixed else 0
        return buckets + cast * sizes.compute + fp8_copies
    gathered: dict[str, int] = {}
    for w in weights:
        gathered[w.unit] = gathered.get(w.unit, 0) + w.gathered_numel(expert_parallel)
    everything = sum(gathered.values())
    root = gathered.pop("root", 0)
    block = max(gathered.values(), default=0)
    unsharded_grads = everything if gradient_sync == "step" and accumulation > 1 else block
    return (root + 2 * block) * sizes.compute + unsharded_grads * 4 + fp8_copies


def checkpointed_blocks(model: PlannedModel) -> frozenset[int]:
    """The blocks pretrain.activation_checkpointing recomputes (dsv3.train.recompute's choice)."""
    n_blocks = model.config.num_hidden_layers + model.config.num_nextn_predict_layers
    mode, every = model.activation_checkpointing, model.activation_checkpointing_every
    return frozenset(checkpointed_block_indices(n_blocks, mode, every))


def row(model: PlannedModel, strategy: str, devices: int, expert_parallel: int, replicate: int = 1) -> Row:
    """The bytes one of `devices` ranks needs under `strategy` ("ddp" or "fsdp") with `expert_parallel` ranks per
    expert group (1 = none; only with fsdp) and `replicate` HSDP replicas (fsdp)."""
    sizes = bytes_per_parameter(model.precision, model.optimizer_states_bf16)
    local = sum(w.local_numel(strategy, devices, expert_parallel, replicate) for w in model.weights)
    fsdp_bf16 = strategy == "fsdp" and (model.precision == "bf16-mixed" or model.precision.startswith("fp8-"))
    residual = sizes.compute if fsdp_bf16 else sizes.weight  # FSDP's bf16 parameters: a bf16 embedding output
    tokens = model.micro_batch_size * model.seq_len
    name = {"ddp": "DDP", "fsdp": "HSDP" if replicate > 1 else "FSDP"}[strategy] + ("+EP" if expert_parallel > 1 else "")
    copies = copies_bytes(
        model.weights, sizes, model.precision, strategy, devices, expert_parallel, replicate,
        model.accumulation(devices), model.gradient_sync,
    )  # fmt: skip
    return Row(
        name, devices, expert_parallel, local,
        params=local * sizes.weight, grads=local * sizes.grad, optimizer=local * sizes.optimizer, copies=copies,
        activations=activation_bytes(model.config, sizes.compute, residual, tokens, checkpointed_blocks(model)),
    )  # fmt: skip


def check_layout(config: DSV3Config, devices: int, expert_parallel: int, strategy: str | None, replicate: int = 1) -> None:
    """One-line ValueErrors for a layout that cannot run: fewer than one device, an expert-parallel size that does
    not divide the routed experts or a replica's devices, or exceeds them, a replica count that does not divide the
    devices, expert parallelism or HSDP under DDP, FSDP on one device."""
    if devices < 1:
        raise ValueError(f"--devices: must be at least 1 (got {devices})")
    if replicate < 1 or devices % replicate:
        raise ValueError(f"pretrain.fsdp_replicate / --fsdp-replicate: {replicate} must divide --devices ({devices})")
    if replicate > 1 and strategy == "ddp":
        raise ValueError("pretrain.fsdp_replicate / --fsdp-replicate: HSDP replicates a sharded model; pass --strategy fsdp or leave it out")
    key = "pretrain.expert_parallel / --expert-parallel"
    if expert_parallel < 1:
        raise ValueError(f"{key}: must be at least 1 (got {expert_parallel})")
    if config.n_routed_experts % expert_parallel:
        raise ValueError(
            f"{key}: {expert_parallel} must divide model.n_routed_experts ({config.n_routed_experts})"
        )
    shard = devices // replicate
    if expert_parallel > shard:
        raise ValueError(f"{key}: {expert_parallel} is larger than --devices ({devices}) / --fsdp-replicate ({replicate}); E ranks hold the experts")
    if shard % expert_parallel:
        raise ValueError(f"{key}: {expert_parallel} must divide --devices ({devices}) / --fsdp-replicate ({replicate}) into expert-parallel groups")
    if expert_parallel > 1 and strategy == "ddp":
        raise ValueError(f"{key}: expert parallelism runs under strategy fsdp; pass --strategy fsdp or leave it out")
    if strategy == "fsdp" and devices == 1:
        raise ValueError("--strategy: fsdp shards over several devices; with --devices 1 plan ddp")


def plan(
    recipe: Recipe,
    devices: int,
    expert_parallel: int | None = None,
    strategy: str | None = None,
    model: PlannedModel | None = None,
    replicate: int | None = None,
) -> list[Row]:
    """Per-device bytes of the recipe's pretraining on `devices` ranks: a DDP row and, on more than one device, an
    FSDP row (only the one `strategy` names, when given) and, when `expert_parallel` (default: the recipe's
    pretrain.expert_parallel, else 1) is above 1, an FSDP+EP row; `replicate` (default pretrain.fsdp_replicate)
    above 1 makes the FSDP rows HSDP. `model`: planned_model(recipe), when the caller already built it. ValueError
    for a layout that cannot run (check_layout)."""
    model = model or planned_model(recipe)
    if expert_parallel is None:
        expert_parallel = getattr(recipe.pretrain, "expert_parallel", 1) if recipe.pretrain is not None else 1
    replicate = model.fsdp_replicate if replicate is None else replicate
    check_layout(model.config, devices, expert_parallel, strategy, replicate)
    rows = []
    if strategy in (None, "ddp") and replicate == 1:
        rows.append(row(model, "ddp", devices, 1))
    if strategy == "fsdp" or (strategy is None and devices > 1):
        rows.append(row(model, "fsdp", devices, 1, replicate))
        if expert_parallel > 1:
            rows.append(row(model, "fsdp", devices, expert_parallel, replicate))
    return rows


def fewest_devices(
    model: PlannedModel, strategy: str, expert_parallel: int, gpu_bytes: int, limit: int = 65536, replicate: int = 1
) -> int | None:
    """The fewest ranks (a multiple of `expert_parallel` × `replicate`, at most `limit`) whose per-device total fits
    in `gpu_bytes` under `strategy`, or None. DDP's total does not shrink with more ranks, so it fits on 1 or never;
    FSDP's only shrinks as N grows (shards shrink, micro-batches per step do not grow): a binary search."""
    if strategy == "ddp":
        return 1 if row(model, "ddp", 1, 1).total <= gpu_bytes else None
    step = expert_parallel * replicate
    low, high = (1 if step > 1 else 2), limit // step  # in units of `step`; FSDP shards over at least 2 ranks
    if high < low or row(model, "fsdp", high * step, expert_parallel, replicate).total > gpu_bytes:
        return None
    while low < high:
        middle = (low + high) // 2
        if row(model, "fsdp", middle * step, expert_parallel, replicate).total <= gpu_bytes:
            high = middle
        else:
            low = middle + 1
    return low * step
