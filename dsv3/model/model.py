"""The DeepSeek-V3 causal LM (report §2): config, transformer block, model, heads, parameter counts.

Field names follow transformers' DeepseekV3Config where they overlap; the additions are named as in DeepSeek's
released config.json: num_nextn_predict_layers (MTP depth D), scoring_func, aux_loss_alpha.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from dsv3.model.attention import MultiHeadLatentAttention
from dsv3.model.moe import FeedForward, GroupedExperts, MoE, Router
from dsv3.model.rope import RotaryEmbedding, rope_inverse_frequencies


@strict
class DSV3Config(PreTrainedConfig):
    """Every hyper-parameter of the network; defaults are the 671B model of the report (Table/§4.2).

    vocab_size: vocabulary size. hidden_size: model width d. intermediate_size: dense FFN width (first layers).
    moe_intermediate_size: width of each routed / shared expert. num_hidden_layers: transformer blocks.
    num_attention_heads / num_key_value_heads: heads n_h (equal: MLA has no grouped KV heads).
    n_shared_experts / n_routed_experts: N_s / N_r. routed_scaling_factor: scale of the routed gate weights.
    kv_lora_rank: d_c. q_lora_rank: d'_c, None = no query compression. qk_nope_head_dim / qk_rope_head_dim /
    v_head_dim: d_h / d_h^R / value head dim. n_group / topk_group: expert groups and groups per token.
    num_experts_per_tok: K_r. first_k_dense_replace: leading layers with a dense FFN. norm_topk_prob: normalise
    the top-k gate weights. rope_parameters: {"rope_type": "default" | "yarn", "rope_theta", and for YaRN
    "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}
    (legacy rope_theta / rope_scaling arguments are accepted). rope_interleave: RoPE on adjacent pairs.
    num_nextn_predict_layers: MTP depth D (0 = none). scoring_func: "sigmoid" (V3) or "softmax" (V2) affinities.
    aux_loss_alpha: α of the complementary sequence-wise balance loss (0 = off).
    """

    model_type = "dsv3"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    # Not remote code: TRL (create_model_from_path, used for GRPO's reference model) reads `config.auto_map` for
    # architectures transformers does not ship; an empty map sends it to AutoModelForCausalLM, where dsv3 is
    # registered. Must be {} (None breaks transformers).
    auto_map = {}  # noqa: RUF012

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    n_group: int | None = 8
    topk_group: int | None = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.006
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    rope_interleave: bool = True
    num_nextn_predict_layers: int = 1
    scoring_func: str = "sigmoid"
    aux_loss_alpha: float = 1e-4

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self) -> None:
        """One-line ValueErrors, each starting with the field it is about ("n_group: ..."), for settings this
        implementation cannot run. The recipe's model section is validated by building a DSV3Config."""
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
            "n_routed_experts", "num_experts_per_tok", "max_position_embeddings", "routed_scaling_factor",
            "rms_norm_eps", "initializer_range",
        )  # fmt: skip
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0 (got {getattr(self, name)!r})")
        for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers", "aux_loss_alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0 (got {getattr(self, name)!r})")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(f"q_lora_rank: must be > 0, or null for no query compression (got {self.q_lora_rank})")
        if self.num_key_value_heads != self.num_attention_heads:
            raise ValueError("num_key_value_heads: must equal num_attention_heads (MLA has no grouped KV heads)")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act: {self.hidden_act!r} is not supported; use 'silu' (SwiGLU experts)")
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ValueError(f"scoring_func: {self.scoring_func!r} is not supported; use 'sigmoid' or 'softmax'")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(
                f"first_k_dense_replace: must be at most num_hidden_layers ({self.num_hidden_layers}), "
                f"got {self.first_k_dense_replace}"
            )
        groups, topk_group = self.n_group or 1, self.topk_group or 1
        if groups <= 0 or self.n_routed_experts % groups:
            raise ValueError(f"n_group: must divide n_routed_experts ({self.n_routed_experts}), got {groups}")
        if not 1 <= topk_group <= groups:
            raise ValueError(f"topk_group: must be between 1 and n_group ({groups}), got {topk_group}")
        if groups > 1 and self.n_routed_experts // groups < 2:
            raise ValueError("n_group: each expert group needs at least 2 experts (groups are ranked by their 2 best scores)")
        if self.num_experts_per_tok > self.n_routed_experts // groups * topk_group:
            raise ValueError(
                f"num_experts_per_tok: must be at most topk_group × experts per group "
                f"({self.n_routed_experts // groups * topk_group}), got {self.num_experts_per_tok}"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim: must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.rope_parameters.get("rope_type", "default") not in ("default", "yarn"):
            raise ValueError(
                f"rope_type: {self.rope_parameters.get('rope_type')!r} is not supported; use 'default' or 'yarn'"
            )


class DecoderLayer(GradientCheckpointingLayer):
    """One transformer block: h = x + MLA(RMSNorm(x)); out = h + FFN(RMSNorm(h)), FFN dense or MoE."""

    def __init__(self, config: DSV3Config, layer_idx: int):
        super().__init__()
        self.self_attn = MultiHeadLatentAttention(config, layer_idx)
        self.is_moe = layer_idx >= config.first_k_dense_replace
        self.mlp = MoE(config) if self.is_moe else FeedForward(config.hidden_size, config.intermediate_size)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Cache | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, C) -> (B, T, C) and the layer's sequence-wise balance loss (None for a dense layer)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        if not self.is_moe:
            return x + self.mlp(self.post_attention_layernorm(x)), None
        y, balance = self.mlp(self.post_attention_layernorm(x), token_mask)
        return x + y, balance


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T) index of the packed document of each token: a new one wherever the position does not increase."""
    restart = position_ids[:, 1:] <= position_ids[:, :-1]
    return F.pad(restart.cumsum(dim=1), (1, 0))


def attention_mask_4d(
    position_ids: torch.Tensor, attention_mask: torch.Tensor | None, past_len: int
) -> torch.Tensor | None:
    """Boolean (B, 1, T, S) mask, True = may attend; None when it is the plain causal mask (SDPA's is_causal).

    Causal over absolute indices; block-diagonal by document when position_ids restart inside a row (only without
    a cache: packed training rows and prefill); key padding from the 2-D attention_mask (B, S). Every query may see
    itself, so fully padded rows stay finite.
    """
    B, T = position_ids.shape
    S = past_len + T
    padded = attention_mask is not None and not bool(attention_mask.all())
    docs = document_ids(position_ids) if past_len == 0 else None
    packed = docs is not None and bool(docs[:, -1].any())
    if not padded and not packed and past_len == 0:
        return None
    q_idx = torch.arange(past_len, S, device=position_ids.device)
    k_idx = torch.arange(S, device=position_ids.device)
    mask = (k_idx[None, :] <= q_idx[:, None]).expand(B, T, S)
    if packed:
        mask = mask & (docs[:, :, None] == docs[:, None, :])
    if padded:
        mask = mask & attention_mask[:, None, -S:].bool()
    return (mask | (k_idx[None, :] == q_idx[:, None])).unsqueeze(1)


# transformers 5.24 renamed the KV cache from `past_key_values` to `cache` (in model outputs and in the keyword
# `generate` passes); the model takes either keyword and its outputs carry the cache under whichever field this
# transformers declares, readable as `.cache` on both.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def pick_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache a caller passed, as `cache=` (transformers >= 5.24) or `past_key_values=` (earlier)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache once, as cache= or as past_key_values=, not both")
    return cache if cache is not None else past_key_values


@dataclass
class DSV3ModelOutput(BaseModelOutputWithPast):
    """last_hidden_state (after the final norm), hidden_before_norm (input of the first MTP module),
    balance_loss (sum over MoE layers, already × aux_loss_alpha), expert_load (n_moe_layers, n_routed_experts)."""

    hidden_before_norm: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None
    if CACHE_FIELD != "cache":
        cache = property(lambda self: self.past_key_values)


@dataclass
class DSV3CausalLMOutput(CausalLMOutputWithPast):
    """loss: next-token CE of the main head; mtp_losses (D,): CE of each MTP depth (None without labels or D = 0);
    balance_loss: complementary sequence-wise loss summed over MoE layers, × aux_loss_alpha;
    expert_load (n_moe_layers, n_routed_experts): token counts of this forward in the main model's MoE layers."""

    mtp_losses: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None
    if CACHE_FIELD != "cache":
        cache = property(lambda self: self.past_key_values)


class DSV3PreTrainedModel(PreTrainedModel):
    config_class = DSV3Config
    config: DSV3Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        """normal(0, initializer_range) for every matrix (0.006 in the report, §4.2), ones for norms, zero bias."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear | nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, Router):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.e_score_correction_bias)
            init.zeros_(module.expert_load)
        elif isinstance(module, GroupedExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, RotaryEmbedding):  # a non-persistent buffer: rebuilt after loading on meta
            inv_freq, _ = rope_inverse_frequencies(self.config.rope_parameters, self.config.qk_rope_head_dim)
            init.copy_(module.inv_freq, inv_freq)


class DSV3Model(DSV3PreTrainedModel):
    """Embedding, the blocks, the final norm. `layers` also holds the D MTP modules (after the main blocks, as in
    DeepSeek's checkpoints); this forward runs only the main blocks, DSV3ForCausalLM runs the MTP modules."""

    def __init__(self, config: DSV3Config):
        super().__init__(config)
        from dsv3.model.mtp import MultiTokenPredictionLayer  # builds on DecoderLayer above

        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        n = config.num_hidden_layers
        self.layers = nn.ModuleList(
            [DecoderLayer(config, i) for i in range(n)]
            + [MultiTokenPredictionLayer(config, n + k) for k in range(config.num_nextn_predict_layers)]
        )
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rope_parameters, config.qk_rope_head_dim)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> DSV3ModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = pick_cache(cache, past_key_values)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        if (
            use_cache is None
        ):  # a cache only helps decoding; training would keep every latent alive for nothing
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=x.device)[None]
        position_ids = position_ids.expand(B, T)
        mask = attention_mask_4d(position_ids, attention_mask, past_len)
        token_mask = None if attention_mask is None else attention_mask[:, -T:].bool()
        cos, sin = self.rotary_emb(position_ids)
        balance, loads = x.new_zeros((), dtype=torch.float32), []
        for layer in self.layers[: self.config.num_hidden_layers]:
            x, layer_balance = layer(x, cos, sin, mask, cache=cache, token_mask=token_mask)
            if layer_balance is not None:
                balance = balance + layer_balance
                loads.append(layer.mlp.gate.expert_load)
        return DSV3ModelOutput(
            **{CACHE_FIELD: cache if use_cache else None},
            last_hidden_state=self.norm(x),
            hidden_before_norm=x,
            balance_loss=balance,
            expert_load=torch.stack(loads) if loads else None,
        )


class DSV3ForCausalLM(DSV3PreTrainedModel, GenerationMixin):
    """DSV3Model + output head, plus the MTP objective (§2.2) when labels are given."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DSV3Config):
        super().__init__(config)
        self.model = DSV3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def moe_gates(self) -> list[Router]:
        """The routers of every MoE layer in layer order (MTP modules last): each has `.e_score_correction_bias`
        (fp32, the balancer updates it in place) and `.expert_load` (token counts of its last forward)."""
        return [layer.mlp.gate for layer in self.model.layers if layer.is_moe]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> DSV3CausalLMOutput:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=pick_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        h = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(h[:, keep, :])
        loss = mtp_losses = None
        balance = out.balance_loss
        if labels is not None:
            loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.vocab_size,
                num_items_in_batch=kwargs.get("num_items_in_batch"),
            )
            if self.config.num_nextn_predict_layers > 0:
                from dsv3.model.mtp import multi_token_prediction_losses

                mtp_losses, mtp_balance = multi_token_prediction_losses(
                    self,
                    out.hidden_before_norm,
                    input_ids,
                    inputs_embeds,
                    labels,
                    attention_mask,
                    position_ids,
                )
                balance = balance + mtp_balance
        return DSV3CausalLMOutput(
            **{CACHE_FIELD: out.cache},
            loss=loss,
            logits=logits,
            mtp_losses=mtp_losses,
            balance_loss=balance,
            expert_load=out.expert_load,
        )


class DSV3ForSequenceClassification(GenericForSequenceClassification, DSV3PreTrainedModel):
    """DSV3Model + a linear score on the last non-pad token (the reward model's head)."""


def count_parameters(config: DSV3Config) -> dict[str, int]:
    """Parameters of the model built on the meta device: total (main model, no MTP), active per token (embedding
    and head included, only num_experts_per_tok routed experts per MoE layer), mtp (the D MTP modules, whose
    embedding and head are shared with the main model)."""
    with torch.device("meta"):
        model = DSV3ForCausalLM(config)
    n = config.num_hidden_layers
    mtp = sum(p.numel() for layer in model.model.layers[n:] for p in layer.parameters())
    total = sum(p.numel() for p in model.parameters()) - mtp
    routed_per_expert = 3 * config.hidden_size * config.moe_intermediate_size  # W1, W2, W3 of one SwiGLU
    n_moe = max(n - config.first_k_dense_replace, 0)
    inactive = n_moe * (config.n_routed_experts - config.num_experts_per_tok) * routed_per_expert
    return {"total": total, "active": total - inactive, "mtp": mtp}
