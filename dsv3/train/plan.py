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

Layouts, on N devices (`--devices`, all ranks of all nodes) with E expert-parallel ranks (`--expert-parallel`):

- DDP: every rank holds the whole model, its gradients and its optimizer state.
- FSDP (FSDP2, `dsv3.train.parallel.parallelize`): `fully_shard` on every decoder block, every MTP module and the
  root (embedding, final norm, head); each parameter is split along its first dimension into N shards (padded to a
  multiple of N, as FSDP2 does), and so are its gradient and its AdamW moments.
- FSDP+EP: the routed experts of every MoE layer (the MTP modules' too) are split over E ranks: each rank holds
  n_routed_experts/E whole experts, replicated across the N/E expert-parallel groups and NOT sharded further by
  FSDP (they are FSDP's ignored parameters, `parallelize` above); everything else is FSDP-sharded over all N ranks.
  torchtitan additionally shards the experts over the N/E replicas; this plan does not, so its expert figure is an
  upper bound for that layout.

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
  the one prefetched) — and one block's unsharded gradient in fp32 before its reduce-scatter; under fp8-blockwise
  the FP8 copy of every block weight, quantised from the gathered weights and saved for the backward: the whole
  model's worth on every rank whatever N. With EP, each rank's own experts are cast to the compute dtype for its
  grouped GEMMs and that copy is saved too (under fp8 their FP8 copy instead: `ExpertParallel` runs them in FP8).

Activations: an estimate, `activation_bytes_per_token`, times micro_batch_size × seq_len tokens; the same on
every strategy except that FSDP's bf16 parameters make the residual stream bf16 (fp32 under autocast otherwise,
the embedding's output being fp32). Expert parallelism moves tokens to their experts' ranks: with balanced loads
each rank computes as many expert rows as without it; an unbalanced step (MaxVio > 0) needs more on the busiest.

Not counted: the CUDA context and NCCL buffers (a few GiB), allocator fragmentation, expert-parallel dispatch
buffers, the router bias and load buffers (8 bytes per expert per MoE layer), activation checkpointing (the
pretraining loop does not use it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dsv3.config import PretrainSection, Recipe
from dsv3.model import DSV3Config, DSV3ForCausalLM
from dsv3.model.moe import GroupedExperts, Router

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

    def local_numel(self, strategy: str, devices: int, expert_parallel: int) -> int:
        """Elements one rank holds: an expert-parallel slice (n_routed_experts/E experts, not further sharded), an
        FSDP2 shard (the first dimension split into `devices` parts, padded up), or the whole tensor (DDP)."""
        if self.expert and expert_parallel > 1:
            return self.numel // expert_parallel
        if strategy == "fsdp":
            return math.ceil(self.shape[0] / devices) * (self.numel // self.shape[0])
        return self.numel


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
    seq_len: int
    pretrain_defaults: bool


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
        setting("micro_batch_size"), recipe.data.seq_len, pretrain is None,
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


def activation_bytes(config: DSV3Config, compute: int, residual: int, tokens: int) -> int:
    """Activations of one micro-batch of `tokens` tokens (micro_batch_size × seq_len), an estimate: the per-token
    bytes of activation_bytes_per_token summed over the dense and MoE layers, the D MTP modules (each a block of the
    kind its index gives plus its input projection) and the 1 + D heads, plus two fp32 logit-sized tensors (the
    gradient of the log-probabilities and of the logits) alive when the backward starts."""
    per = activation_bytes_per_token(config, compute, residual)
    n, dense_layers, depth = config.num_hidden_layers, config.first_k_dense_replace, config.num_nextn_predict_layers
    mtp_blocks = sum(per["MoE layer"] if n + k >= dense_layers else per["dense layer"] for k in range(depth))
    per_token = (
        dense_layers * per["dense layer"] + (n - dense_layers) * per["MoE layer"]
        + mtp_blocks + depth * per["MTP module"] + (1 + depth) * per["head"] + 2 * 4 * config.vocab_size
    )  # fmt: skip
    return int(per_token * tokens)


# ---------------------------------------------------------------------------------------------- per device


def copies_bytes(
    weights: tuple[Weight, ...], sizes: BytesPerParameter, precision: str, strategy: str, devices: int, expert_parallel: int
) -> int:
    """The "copies" column of the module docstring: DDP's gradient buckets and autocast / FP8 weight copies saved for
    the backward; FSDP's gathered root and two gathered blocks in the compute dtype, one block's fp32 unsharded
    gradient, FP8 copies of every block weight and the compute-dtype copy of a rank's own experts under EP."""
    in_fp8 = precision.startswith("fp8-")
    mixed = precision == "bf16-mixed" or in_fp8

    def local(w: Weight) -> int:
        return w.local_numel(strategy, devices, expert_parallel)

    def own_expert(w: Weight) -> bool:  # an expert-parallel slice: not FSDP's, run in the compute dtype
        return w.expert and expert_parallel > 1

    fp8_copies = sum(local(w) for w in weights if w.fp8) if in_fp8 else 0  # 1 byte each, own experts included
    if strategy == "ddp":
        buckets = sum(local(w) for w in weights) * sizes.grad if devices > 1 else 0
        cast = sum(local(w) for w in weights if w.matmul and not (in_fp8 and w.fp8)) if mixed else 0
        return buckets + cast * sizes.compute + fp8_copies
    own_copies = sum(local(w) for w in weights if own_expert(w) and not (in_fp8 and w.fp8)) * sizes.compute if mixed else 0
    gathered: dict[str, int] = {}
    for w in weights:
        if not own_expert(w):
            gathered[w.unit] = gathered.get(w.unit, 0) + w.numel
    root = gathered.pop("root", 0)
    block = max(gathered.values(), default=0)
    return (root + 2 * block) * sizes.compute + block * 4 + fp8_copies + own_copies


def row(model: PlannedModel, strategy: str, devices: int, expert_parallel: int) -> Row:
    """The bytes one of `devices` ranks needs under `strategy` ("ddp" or "fsdp") with `expert_parallel` ranks per
    expert group (1 = none; only with fsdp)."""
    sizes = bytes_per_parameter(model.precision, model.optimizer_states_bf16)
    local = sum(w.local_numel(strategy, devices, expert_parallel) for w in model.weights)
    fsdp_bf16 = strategy == "fsdp" and (model.precision == "bf16-mixed" or model.precision.startswith("fp8-"))
    residual = sizes.compute if fsdp_bf16 else sizes.weight  # FSDP's bf16 parameters: a bf16 embedding output
    tokens = model.micro_batch_size * model.seq_len
    name = {"ddp": "DDP", "fsdp": "FSDP"}[strategy] + ("+EP" if expert_parallel > 1 else "")
    return Row(
        name, devices, expert_parallel, local,
        params=local * sizes.weight, grads=local * sizes.grad, optimizer=local * sizes.optimizer,
        copies=copies_bytes(model.weights, sizes, model.precision, strategy, devices, expert_parallel),
        activations=activation_bytes(model.config, sizes.compute, residual, tokens),
    )  # fmt: skip


def check_layout(config: DSV3Config, devices: int, expert_parallel: int, strategy: str | None) -> None:
    """One-line ValueErrors for a layout that cannot run: fewer than one device, an expert-parallel size that does
    not divide the routed experts or the devices, or exceeds them, expert parallelism under DDP, FSDP on one device."""
    if devices < 1:
        raise ValueError(f"--devices: must be at least 1 (got {devices})")
    key = "pretrain.expert_parallel / --expert-parallel"
    if expert_parallel < 1:
        raise ValueError(f"{key}: must be at least 1 (got {expert_parallel})")
    if config.n_routed_experts % expert_parallel:
        raise ValueError(
            f"{key}: {expert_parallel} must divide model.n_routed_experts ({config.n_routed_experts})"
        )
    if expert_parallel > devices:
        raise ValueError(f"{key}: {expert_parallel} is larger than --devices ({devices}); E ranks hold the experts")
    if devices % expert_parallel:
        raise ValueError(f"{key}: {expert_parallel} must divide --devices ({devices}) into expert-parallel groups")
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
) -> list[Row]:
    """Per-device bytes of the recipe's pretraining on `devices` ranks: a DDP row and, on more than one device, an
    FSDP row (only the one `strategy` names, when given) and, when `expert_parallel` (default: the recipe's
    pretrain.expert_parallel, else 1) is above 1, an FSDP+EP row. `model`: planned_model(recipe), when the caller
    already built it. ValueError for a layout that cannot run (check_layout)."""
    model = model or planned_model(recipe)
    if expert_parallel is None:
        expert_parallel = getattr(recipe.pretrain, "expert_parallel", 1) if recipe.pretrain is not None else 1
    check_layout(model.config, devices, expert_parallel, strategy)
    rows = []
    if strategy in (None, "ddp"):
        rows.append(row(model, "ddp", devices, 1))
    if strategy == "fsdp" or (strategy is None and devices > 1):
        rows.append(row(model, "fsdp", devices, 1))
        if expert_parallel > 1:
            rows.append(row(model, "fsdp", devices, expert_parallel))
    return rows


def fewest_devices(model: PlannedModel, strategy: str, expert_parallel: int, gpu_bytes: int, limit: int = 65536) -> int | None:
    """The fewest ranks (a multiple of `expert_parallel`, at most `limit`) whose per-device total fits in `gpu_bytes`
    under `strategy`, or None. DDP's total does not shrink with more ranks, so it fits on 1 or never; FSDP's only
    shrinks as N grows (a binary search)."""
    if strategy == "ddp":
        return 1 if row(model, "ddp", 1, 1).total <= gpu_bytes else None
    step = expert_parallel
    low, high = (1 if step > 1 else 2), limit // step  # in units of `step`; FSDP shards over at least 2 ranks
    if high < low or row(model, "fsdp", high * step, expert_parallel).total > gpu_bytes:
        return None
    while low < high:
        middle = (low + high) // 2
        if row(model, "fsdp", middle * step, expert_parallel).total <= gpu_bytes:
            high = middle
        else:
            low = middle + 1
    return low * step
