"""DeepSeekMoE with auxiliary-loss-free load balancing, DeepSeek-V3 report §2.1.2, eqs. 12-20.

Routing follows the reference code and transformers' DeepseekV3TopkRouter exactly: sigmoid affinities, a
per-expert bias added only to choose experts, groups ranked by the sum of their two best biased scores, gate
weights from the unbiased scores of the chosen experts, normalised and scaled by routed_scaling_factor. No token
is ever dropped. Routed experts run as one grouped GEMM over tokens sorted by expert.

torch._grouped_mm (CPU and CUDA, torch 2.13) rules, checked here: inputs float32 / bfloat16 / float16 (both
operands the same dtype; no float64); `offs` int32 cumulative row ends, the last equal to the number of rows
(rows past it come back uninitialised); every row stride a multiple of 16 bytes, hence hidden_size and
moe_intermediate_size multiples of 8; the output gradient must not be an expanded (stride-0) tensor.

Compiled (`dsv3.train.compile`): every shape in the dispatch is fixed by (B, T) — the tokens per expert live only
in the values of `offsets`, never in a shape (no bincount, no `.item()`) — so a block compiles once and does not
recompile when the expert loads change, and there is no graph break. torch._grouped_mm's fake (meta) kernel
accepts bfloat16 only, so under torch.compile other dtypes go through `dsv3::grouped_linear`, the same kernel as a
custom op with its own shape function and backward; eager calls torch._grouped_mm as it always did.
"""

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """SwiGLU FFN: W2(SiLU(W1 x) ⊙ W3 x). The dense layers and the shared experts FFN^(s) of eq. 12."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """The gate of eqs. 13-16 with the bias term of §2.1.2 (loss-free balancing).

    `e_score_correction_bias` (fp32 buffer, never trained by gradients) is added to the affinities only to select
    the top-k experts; the balancer nudges it after each optimizer step (b_i += γ·sign(mean load − load_i)).
    `expert_load` holds the per-expert token counts of the last forward (float32, shape (n_routed_experts,)).
    """

    def __init__(self, config):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group or 1
        self.topk_group = config.topk_group or 1
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.scoring_func = config.scoring_func
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))  # centroids e_i
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        self.register_buffer(
            "expert_load", torch.zeros(self.n_experts, dtype=torch.float32), persistent=False
        )

    def _apply(self, fn, recurse=True):
        """Move with the module but stay fp32: ±γ steps of 1e-3 are below bf16 resolution near 1, and so are token
        counts above 256."""
        before = {name: getattr(self, name) for name in ("e_score_correction_bias", "expert_load")}
        super()._apply(fn, recurse)
        for name, buffer in before.items():
            if getattr(self, name).dtype != torch.float32:
                device = getattr(self, name).device
                setattr(
                    self,
                    name,
                    torch.zeros_like(buffer, device=device)
                    if buffer.is_meta
                    else buffer.to(device=device, dtype=torch.float32),
                )
        return self

    def affinities(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 15: s_{i,t} = Sigmoid(u_t^T e_i) (softmax for V2-style configs), in fp32; (N, C) -> (N, E)."""
        with torch.autocast(x.device.type, enabled=False):  # the gate stays fp32 under mixed precision too
            logits = F.linear(x.float(), self.weight.float())
        return logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)

    def select_experts(self, scores: torch.Tensor) -> torch.Tensor:
        """Eq. 14 with the bias and the group (node) limit: indices (N, K) of the chosen experts."""
        biased = scores.detach() + self.e_score_correction_bias
        if self.n_group > 1:
            grouped = biased.view(-1, self.n_group, self.n_experts // self.n_group)  # (N, G, E/G)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G): sum of each group's 2 best
            best_groups = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
            biased = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(-1, self.n_experts)
        return biased.topk(self.top_k, dim=-1, sorted=False).indices

    def gate_weights(self, scores: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
        """Eqs. 13 and 16: the unbiased scores of the chosen experts, normalised, times the route scale; (N, K)."""
        weights = scores.gather(1, topk_idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) -> chosen experts (N, K), gate weights (N, K) fp32, affinities (N, E) fp32."""
        scores = self.affinities(x)
        topk_idx = self.select_experts(scores)
        return topk_idx, self.gate_weights(scores, topk_idx), scores


@torch.library.custom_op("dsv3::grouped_linear", mutates_args=())
def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows offs[e-1]:offs[e] of x (N, in) times weight[e]ᵀ, weight (E, out, in) -> (N, out): torch._grouped_mm as
    one op torch.compile treats as opaque, for the dtypes its own fake kernel refuses (all but bfloat16)."""
    return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs).contiguous()


@grouped_linear.register_fake
def _grouped_linear_shape(x, weight, offs):
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("dsv3::grouped_linear_backward", mutates_args=())
def grouped_linear_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `grouped_linear`: dx = grad_e W_e (N, in) and dW_e = grad_eᵀ x_e (E, out, in), each as one grouped
    GEMM, dW computed in the weight's own layout (no transposed copy); an expert without rows gets zeros."""
    grad = grad.contiguous()
    dx = torch._grouped_mm(grad, weight, offs=offs)
    dw = torch._grouped_mm(grad.t(), x, offs=offs)
    return dx.contiguous(), dw.contiguous()


@grouped_linear_backward.register_fake
def _grouped_linear_backward_shapes(grad, x, weight, offs):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _grouped_linear_save(ctx, inputs, output):
    x, weight, offs = inputs
    ctx.save_for_backward(x, weight, offs)


def _grouped_linear_grad(ctx, grad):
    x, weight, offs = ctx.saved_tensors
    dx, dw = grouped_linear_backward(grad, x, weight, offs)
    return dx, dw, None


grouped_linear.register_autograd(_grouped_linear_grad, setup_context=_grouped_linear_save)


class GroupedExperts(nn.Module):
    """The routed experts FFN^(r)_i of eq. 12: SwiGLU weights stacked over experts, run as grouped GEMMs.

    gate_up_proj (E, 2·I, C) holds [W1; W3] of every expert, down_proj (E, C, I) its W2 (nn.Linear layout per
    expert). Every matmul of the routed experts goes through `grouped_matmul`.
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        if dim % 8 or inter_dim % 8:
            raise ValueError(
                f"hidden_size ({dim}) and moe_intermediate_size ({inter_dim}) must be multiples of 8 for the grouped GEMM"
            )
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim))

    @staticmethod
    def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Rows offsets[i-1]:offsets[i] of x (N, in) times weight[i]^T (out, in) -> (N, out).

        Both operands in one dtype: the autocast dtype when autocast is on (grouped_mm is not on its cast lists),
        else the weight's.
        """
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        if torch.compiler.is_compiling() and dtype != torch.bfloat16:
            return grouped_linear(x.to(dtype), weight.to(dtype), offsets)
        return torch._grouped_mm(x.to(dtype), weight.to(dtype).transpose(-2, -1), offs=offsets)

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted (N, C): tokens sorted by expert; counts (E,): rows per expert -> (N, C)."""
        offsets = counts.cumsum(0).to(torch.int32)
        gate, up = self.grouped_matmul(x_sorted, self.gate_up_proj, offsets).chunk(2, dim=-1)
        return self.grouped_matmul(F.silu(gate) * up, self.down_proj, offsets)


def tokens_per_expert(sorted_experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Counts (E,) of each expert id in `sorted_experts` (ascending), a shape fixed by E whatever the loads are
    (bincount's output length depends on the values, which torch.compile cannot trace without a graph break)."""
    ends = torch.searchsorted(sorted_experts, torch.arange(n_experts, device=sorted_experts.device), right=True)
    return torch.diff(ends, prepend=ends.new_zeros(1))


def sequence_balance_loss(
    scores: torch.Tensor, topk_idx: torch.Tensor, token_mask: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """Complementary sequence-wise balance loss, eqs. 17-20, averaged over the sequences of the batch.

    L_Bal = α Σ_i f_i P_i,  f_i = N_r / (K_r T) Σ_t 1[i ∈ top-k of t],  P_i = (1/T) Σ_t s'_{i,t},
    s'_{i,t} = s_{i,t} / Σ_j s_{j,t}. scores (B, T, E), topk_idx (B, T, K), token_mask (B, T) or None: masked
    (padding) tokens are left out and T counts the others.
    """
    B, T, E = scores.shape
    K = topk_idx.shape[-1]
    mask = scores.new_ones(B, T) if token_mask is None else token_mask.to(scores.dtype)
    n_tokens = mask.sum(dim=1).clamp(min=1)  # (B,)
    chosen = torch.zeros_like(scores).scatter_(2, topk_idx, 1.0)  # (B, T, E)
    f = E / (K * n_tokens[:, None]) * (chosen * mask[..., None]).sum(dim=1)  # eq. 18, (B, E)
    s_norm = scores / scores.sum(dim=-1, keepdim=True)  # eq. 19
    P = (s_norm * mask[..., None]).sum(dim=1) / n_tokens[:, None]  # eq. 20, (B, E)
    return alpha * (f * P).sum(dim=-1).mean()  # eq. 17


class MoE(nn.Module):
    """h' = u + Σ FFN^(s)(u) + Σ g_{i,t} FFN^(r)_i(u) (eq. 12; the residual u is added by the block)."""

    def __init__(self, config):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.aux_loss_alpha = config.aux_loss_alpha
        self.gate = Router(config)
        self.experts = GroupedExperts(
            config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        )
        self.shared_experts = FeedForward(
            config.hidden_size, config.moe_intermediate_size * config.n_shared_experts
        )

    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C), token_mask (B, T) bool or None -> output (B, T, C), sequence-wise balance loss (scalar)."""
        B, T, C = x.shape
        flat = x.reshape(-1, C)
        topk_idx, weights, scores = self.gate(flat)  # (N, K), (N, K), (N, E)
        K = topk_idx.shape[-1]
        expert_of = topk_idx.reshape(-1)  # (N·K,) one entry per (token, slot)
        order = expert_of.argsort(stable=True)
        token_of = order // K  # the token of each sorted entry
        counts = tokens_per_expert(expert_of.index_select(0, order), self.n_experts)
        # index_select, not flat[token_of]: the backward of advanced indexing (index_put_ with accumulate) sums in
        # a thread-dependent order on CPU, index_select's (index_add_) does not: same seed, same numbers.
        y = self.experts(flat.index_select(0, token_of), counts)  # (N·K, C) sorted by expert
        y = (y * weights.reshape(-1).index_select(0, order)[:, None]).to(x.dtype)
        routed = torch.zeros_like(flat).index_add_(0, token_of, y)
        valid = None if token_mask is None else token_mask.reshape(-1, 1).expand(-1, K).reshape(-1)
        # written in place: a buffer rebound to a tensor made under inference_mode would fail a compiled block's
        # guards at its next call and compile it once more
        self.gate.expert_load.copy_(
            counts if valid is None else torch.zeros_like(self.gate.expert_load).index_add_(0, expert_of, valid.float())
        )
        balance = (
            sequence_balance_loss(
                scores.view(B, T, -1), topk_idx.view(B, T, K), token_mask, self.aux_loss_alpha
            )
            if self.aux_loss_alpha > 0
            else x.new_zeros((), dtype=torch.float32)
        )
        return routed.view(B, T, C) + self.shared_experts(x), balance
