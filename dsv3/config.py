"""Recipes: typed, validated YAML describing one run of the pipeline.

A recipe is a YAML file whose top-level sections configure the stages (`data`, `tokenizer`, `model`,
`pretrain`, ...). A recipe may build on another with `base: other.yaml` (resolved relative to the file)
so ablations are small overlays, and any value can be overridden from the command line with
`--set section.key=value`. Everything is validated by the pydantic schema below: an unknown key, a wrong
type or an out-of-range value raises `RecipeError` with one line naming the dotted key and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

if TYPE_CHECKING:
    from dsv3.model import DSV3Config


class RecipeError(ValueError):
    """A recipe that cannot be used; the message is one line naming the key and what is allowed."""


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


MIXTURE_SOURCES = ("corpus", "copy", "retrieval", "math")


class DataSection(Section):
    """Where the training text comes from and how it is cut into sequences (docs/paper.md, "Pretraining")."""

    source: Literal["stdlib", "local", "hf"] = "stdlib"
    paths: list[str] = Field(default_factory=list, description="files or folders for source=local")
    hf_name: str | None = Field(None, description="dataset name (or local dataset folder) for source=hf")
    hf_config: str | None = None
    hf_split: str = "train"
    text_field: str = "text"
    max_bytes: int = Field(4_000_000, gt=0, description="cap on the corpus size in bytes")
    max_documents: int | None = Field(None, gt=0)
    validation_fraction: float = Field(0.05, gt=0, lt=1)
    seq_len: int = Field(256, ge=8, le=1_048_576)
    fim_rate: float = Field(0.1, ge=0, le=1, description="fraction of documents turned into PSM FIM")
    split_punctuation_rate: float = Field(
        0.1, ge=0, le=1, description="fraction of punctuation+line-break tokens split when encoding"
    )
    mixture: dict[str, float | dict[float, float]] | None = Field(
        None,
        description="pretraining sources (corpus = data.source; generated: copy, retrieval, math) -> a weight, or "
        "{training fraction: weight} piecewise constant from each fraction on; null = the corpus alone",
    )

    @model_validator(mode="after")
    def _source_needs_its_location(self) -> DataSection:
        if self.source == "local" and not self.paths:
            raise ValueError("data.paths: source=local needs at least one file or folder")
        if self.source == "hf" and not self.hf_name:
            raise ValueError("data.hf_name: source=hf needs a dataset name or local dataset folder")
        return self

    @model_validator(mode="after")
    def _mixture_is_a_schedule(self) -> DataSection:
        if self.mixture is None:
            return self
        unknown = set(self.mixture) - set(MIXTURE_SOURCES)
        if unknown or "corpus" not in self.mixture:
            raise ValueError(
                f"data.mixture: sources must include corpus and be among {', '.join(MIXTURE_SOURCES)}"
                + (f"; {', '.join(sorted(unknown))} unknown" if unknown else "")
            )
        for source, weight in self.mixture.items():
            schedule = weight if isinstance(weight, dict) else {0.0: weight}
            if 0.0 not in schedule or any(not 0 <= f < 1 for f in schedule):
                raise ValueError(f"data.mixture.{source}: training fractions must lie in [0, 1) and start at 0.0")
            if any(w < 0 for w in schedule.values()):
                raise ValueError(f"data.mixture.{source}: weights must be >= 0")
        from dsv3.data.mixture import mean_shares  # the data layer imports this module

        mean_shares(self.mixture)  # a ValueError where every weight is 0 from some fraction on
        return self


class TokenizerSection(Section):
    """Byte-level BPE (docs/paper.md, "Model": vocab) trained on the training split."""

    vocab_size: int = Field(4096, ge=300, le=1_000_000)
    min_frequency: int = Field(2, ge=1)
    max_training_bytes: int | None = Field(None, gt=0, description="train on at most this many bytes")


class ModelSection(Section):
    """The network (docs/paper.md, "Model"): the fields of DSV3Config (dsv3.model), named as transformers'
    DeepseekV3Config; defaults are the 671B model's. Validated by building the DSV3Config itself, so the checks live
    in one place. `vocab_size: null` = the tokenizer's; `rope_theta` is plain RoPE's base (YaRN is the extend
    stage's: see the extend section). The fields are spelled out here, not read from DSV3Config, so that reading a
    recipe imports neither torch nor transformers until a model section is validated; tests/test_config.py checks
    that they are DSV3Config's, less MODEL_FIELDS_FROM_ELSEWHERE, with its types and defaults."""

    vocab_size: int | None = Field(None, description="null = the tokenizer's vocabulary size")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base")
    hidden_size: int = Field(7168, description="model width d")
    intermediate_size: int = Field(18432, description="dense FFN width (the first_k_dense_replace layers)")
    moe_intermediate_size: int = Field(2048, description="width of each routed / shared expert")
    num_hidden_layers: int = Field(61, description="transformer blocks")
    num_attention_heads: int = Field(128, description="heads n_h")
    n_shared_experts: int = Field(1, description="shared experts N_s")
    n_routed_experts: int = Field(256, description="routed experts N_r")
    routed_scaling_factor: float = Field(2.5, description="scale of the routed gate weights")
    kv_lora_rank: int = Field(512, description="KV compression dimension d_c")
    q_lora_rank: int | None = Field(1536, description="query compression dimension d'_c; null = none")
    qk_rope_head_dim: int = Field(64, description="decoupled RoPE head dimension d_h^R")
    qk_nope_head_dim: int = Field(128, description="per-head query/key dimension d_h")
    v_head_dim: int = Field(128, description="per-head value dimension")
    n_group: int | None = Field(8, description="expert groups (node-limited routing)")
    topk_group: int | None = Field(4, description="groups each token may route to")
    num_experts_per_tok: int = Field(8, description="routed experts per token K_r")
    first_k_dense_replace: int = Field(3, description="leading layers with a dense FFN")
    norm_topk_prob: bool = Field(True, description="normalise the top-k gate weights")
    max_position_embeddings: int = Field(4096, description="context length the model is built for")
    initializer_range: float = Field(0.006, description="std of the normal weight init")
    rms_norm_eps: float = Field(1e-6, description="RMSNorm epsilon")
    tie_word_embeddings: bool = Field(False, description="share the input embedding and the output head")
    rope_interleave: bool = Field(True, description="RoPE on adjacent pairs")
    num_nextn_predict_layers: int = Field(1, description="MTP depth D (0 = none)")
    scoring_func: str = Field("sigmoid", description='"sigmoid" (V3) or "softmax" (V2) affinities')
    aux_loss_alpha: float = Field(1e-4, description="α of the complementary sequence-wise balance loss (0 = off)")

    @model_validator(mode="after")
    def _builds_a_config(self):
        try:
            self.config(vocab_size=self.vocab_size or 1, bos_token_id=None, eos_token_id=None)
        except (ValueError, TypeError) as err:
            raise ValueError(f"model.{str(err).splitlines()[0]}") from None
        return self

    def config(self, vocab_size: int, **token_ids) -> DSV3Config:
        """The DSV3Config of this section, with the tokenizer's vocabulary size and special token ids."""
        # torch and transformers: imported when a model section is validated, not with the schema
        from dsv3.model import DSV3Config

        fields = self.model_dump()
        theta = fields.pop("rope_theta")
        fields["vocab_size"] = vocab_size
        return DSV3Config(**fields, rope_parameters={"rope_type": "default", "rope_theta": theta}, **token_ids)


# Fields of DSV3Config a recipe does not set: the tokenizer sets the token ids, rope_theta sets rope_parameters, and
# MLA / SwiGLU / the cache leave no choice.
MODEL_FIELDS_FROM_ELSEWHERE = {
    "num_key_value_heads", "hidden_act", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "rope_parameters",
}  # fmt: skip


class PretrainSection(Section):
    """Pretraining (docs/paper.md, "Pretraining", "Balancing", "Multi-token prediction"): the run's length, its batch,
    AdamW, and the schedules, each a function of the tokens seen expressed as fractions of the whole run (the
    paper's 14.8T-token run gives the defaults: constant LR until 10T = 0.676, cosine until 14.3T = 0.966, ...)."""

    tokens: int | None = Field(None, gt=0, description="training tokens; exactly one of tokens or steps")
    steps: int | None = Field(None, gt=0, description="optimizer steps; exactly one of tokens or steps")
    global_batch_size: int = Field(32, gt=0, description="sequences per optimizer step, all ranks together")
    micro_batch_size: int = Field(8, gt=0, description="sequences per forward pass on one rank")
    batch_size_start: int | None = Field(
        None, gt=0, description="batch-size ramp: sequences per step at the start (null = no ramp)"
    )
    batch_ramp_fraction: float = Field(0.0317, ge=0, le=1, description="ramp length (469B of 14.8T tokens)")
    lr_peak: float = Field(2.2e-4, gt=0, le=1, description="LR after the linear warm-up")
    lr_warmup_fraction: float = Field(0.01, ge=0, le=1, description="linear warm-up length")
    lr_decay_start_fraction: float = Field(0.676, ge=0, le=1, description="end of the constant phase")
    lr_decay_end_fraction: float = Field(0.966, ge=0, le=1, description="end of the cosine decay to lr_final")
    lr_final: float = Field(2.2e-5, ge=0, le=1, description="LR after the cosine decay, held until the tail")
    lr_tail_start_fraction: float = Field(0.989, ge=0, le=1, description="where the last constant LR starts")
    lr_tail: float = Field(7.3e-6, ge=0, le=1, description="LR of the last tokens (167B of 14.8T)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decay on matrices; none on norms and biases")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0, description="not published; PyTorch's default")
    grad_clip: float = Field(1.0, gt=0, description="global gradient-norm clip")
    mtp_lambda: float = Field(0.3, ge=0, description="MTP weight λ before the switch")
    mtp_lambda_after: float = Field(0.1, ge=0, description="MTP weight λ after the switch")
    mtp_lambda_switch_fraction: float = Field(0.676, ge=0, le=1, description="λ switch (10T of 14.8T)")
    balancing: Literal["loss_free", "aux_loss"] = Field(
        "loss_free",
        description="loss_free: router-bias updates; aux_loss: no bias updates, balance through α = model.aux_loss_alpha",
    )
    bias_update_speed: float = Field(0.001, ge=0, description="bias update speed γ before the switch")
    bias_update_speed_after: float = Field(0.0, ge=0, description="γ after the switch")
    bias_update_switch_fraction: float = Field(0.966, ge=0, le=1, description="γ switch (14.3T of 14.8T)")
    document_masking: bool = Field(False, description="block-diagonal attention per packed document (paper: off)")
    precision: Literal["32-true", "bf16-mixed", "bf16-true", "fp8-blockwise", "fp8-tensorwise"] = Field(
        "32-true",
        description="fp8-blockwise: FP8 GEMMs in the blocks' linear layers (1x128 / 128x128 scales), BF16 autocast "
        "elsewhere; fp8-tensorwise: the same with one scale per tensor (the baseline fine-grained scaling beats)",
    )
    fp8_backend: Literal["auto", "emulated", "scaled_mm"] = Field(
        "auto", description="FP8 GEMMs: scaled_mm (Hopper GPUs), emulated (anywhere), auto picks"
    )
    optimizer_states_bf16: bool = Field(False, description="AdamW moments stored in BF16 (the paper's choice)")
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    compile: bool = Field(
        False, description="torch.compile each decoder and MTP block in place (regional); eager when false"
    )
    deterministic: bool = Field(
        True, description="torch.use_deterministic_algorithms: the same seed and threads give bit-identical runs"
    )
    devices: int = Field(1, ge=1, description="processes per node; > 1 launches torchrun")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="several processes: ddp replicates the model; fsdp shards it (FSDP2), with expert_parallel"
    )
    expert_parallel: int = Field(
        1, ge=1, description="ranks the routed experts of every MoE layer are split over (strategy fsdp)"
    )
    fsdp_replicate: int = Field(
        1, ge=1, description="HSDP (strategy fsdp): replicas of the sharded model; each of them shards it over "
        "devices × num_nodes / fsdp_replicate ranks (e.g. one node each)"
    )
    gradient_sync: Literal["step", "micro_batch"] = Field(
        "step", description="strategy fsdp: reduce-scatter the gradients once per optimizer step (holding each "
        "rank's unsharded gradients between micro-batches) or after every micro-batch (less memory, more traffic)"
    )
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        "none", description="recompute blocks' activations in the backward: every block (full) or every "
        "activation_checkpointing_every-th (selective)"
    )
    activation_checkpointing_every: int = Field(2, ge=1, description="selective: checkpoint blocks k, 2k, 3k, …")
    num_nodes: int = Field(1, ge=1, description="nodes; > 1 launches torchrun on each node")
    max_restarts: int = Field(
        0, ge=0, description="torchrun --max-restarts: a job whose rank died is restarted this often, every rank "
        "resuming from the last checkpoint (devices × num_nodes > 1)"
    )
    val_every_n_steps: int = Field(100, gt=0, description="validation (and best checkpoint) interval")
    val_max_rows: int | None = Field(None, gt=0, description="cap on validation sequences (null = all)")
    checkpoint_every_n_steps: int = Field(50, gt=0, description="interval of the `last` checkpoint")
    log_every_n_steps: int = Field(10, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> PretrainSection:
        if (self.tokens is None) == (self.steps is None):
            raise ValueError("pretrain.tokens: set exactly one of pretrain.tokens or pretrain.steps")
        ranks = self.devices * self.num_nodes
        if self.global_batch_size % (self.micro_batch_size * ranks):
            raise ValueError(
                f"pretrain.global_batch_size: must be a multiple of micro_batch_size × devices × num_nodes "
                f"({self.micro_batch_size * ranks})"
            )
        accumulation = self.global_batch_size // (self.micro_batch_size * ranks)
        if self.batch_size_start is not None and (
            self.batch_size_start > self.global_batch_size or self.batch_size_start % (accumulation * ranks)
        ):
            raise ValueError(
                "pretrain.batch_size_start: must be at most global_batch_size and a multiple of "
                f"devices × num_nodes × gradient-accumulation steps ({accumulation * ranks})"
            )
        if self.strategy == "fsdp" and ranks == 1:
            raise ValueError(
                "pretrain.strategy: fsdp shards over several processes; with devices × num_nodes = 1 use strategy ddp "
                "(a sharded checkpoint still resumes there)"
            )
        if self.expert_parallel > 1 and self.strategy != "fsdp":
            raise ValueError("pretrain.expert_parallel: expert parallelism runs under strategy fsdp; set pretrain.strategy=fsdp")
        if self.fsdp_replicate > 1 and self.strategy != "fsdp":
            raise ValueError("pretrain.fsdp_replicate: HSDP replicates a sharded model; set pretrain.strategy=fsdp")
        if ranks % self.fsdp_replicate:
            raise ValueError(
                f"pretrain.fsdp_replicate: {self.fsdp_replicate} must divide the world size devices × num_nodes ({ranks})"
            )
        shard = ranks // self.fsdp_replicate
        if shard % self.expert_parallel:
            raise ValueError(
                f"pretrain.expert_parallel: {self.expert_parallel} must divide the world size devices × num_nodes "
                f"/ fsdp_replicate ({shard})"
            )
        fractions = [
            self.lr_warmup_fraction,
            self.lr_decay_start_fraction,
            self.lr_decay_end_fraction,
            self.lr_tail_start_fraction,
        ]
        if fractions != sorted(fractions):
            raise ValueError(
                "pretrain.lr_warmup_fraction: need warmup <= decay_start <= decay_end <= tail_start fractions"
            )
        return self


class ExtendPhase(Section):
    """One phase of context extension: packed rows of seq_len tokens for `steps` optimizer steps (or `tokens`)."""

    seq_len: int = Field(ge=16, le=1_048_576, description="row length of this phase (paper: 32K, then 128K)")
    steps: int | None = Field(None, gt=0, description="optimizer steps (paper: 1000); exactly one of steps or tokens")
    tokens: int | None = Field(None, gt=0, description="training tokens; exactly one of steps or tokens")
    global_batch_size: int = Field(8, gt=0, description="rows per optimizer step")
    micro_batch_size: int = Field(1, gt=0, description="rows per forward pass")

    @model_validator(mode="after")
    def _one_length(self) -> ExtendPhase:
        if (self.tokens is None) == (self.steps is None):
            raise ValueError("extend.phases.steps: set exactly one of steps or tokens per phase")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError("extend.phases.global_batch_size: must be a multiple of micro_batch_size")
        return self


class ExtendSection(Section):
    """Context extension with YaRN (docs/paper.md, "Context extension (YaRN)"): RoPE dims switched to YaRN with factor
    s, ramp β_fast = 32 / β_slow = 1 over the pretraining length, temperature √(1/t) = 0.1·mscale·ln s + 1 (the
    softmax scale times its square); two phases on longer packed rows (4K → 32K → 128K, 1000 steps each, LR 7.3e-6).
    The training mix may hold synthetic passkey documents (training keys, training-split filler); the evaluation
    (passkey accuracy per length and depth, perplexity per length, before and after) uses held-out keys and
    filler."""

    phases: list[ExtendPhase] = Field(min_length=1, description="training phases in order of growing seq_len")
    factor: float = Field(40.0, gt=1, description="YaRN scale s (paper: 40)")
    beta_fast: float = Field(32.0, gt=0, description="β: rotary pairs with more rotations over the original length keep their frequency")
    beta_slow: float = Field(1.0, gt=0, description="α: pairs with fewer rotations are interpolated by s")
    mscale: float = Field(1.0, ge=0, description="coefficient of 0.1·ln s in the attention temperature √(1/t)")
    mscale_all_dim: float = Field(1.0, ge=0, description="the same for the softmax scale (reference: = mscale)")
    lr: float = Field(7.3e-6, gt=0, le=1, description="constant LR after the warm-up (paper: 7.3e-6)")
    lr_warmup_steps: int = Field(0, ge=0, description="linear warm-up at the start of each phase")
    mtp_lambda: float = Field(0.1, ge=0, description="MTP weight λ (the paper's value at the end of pretraining)")
    bias_update_speed: float = Field(0.0, ge=0, description="router-bias update speed γ (paper: 0 after 14.3T)")
    retrieval_fraction: float = Field(0.0, ge=0, lt=1, description="share of training rows that are synthetic passkey documents")
    passkey_digits: int = Field(5, ge=1, le=20, description="digits of a passkey")
    passkey_lengths: list[int] = Field(default_factory=lambda: [4096, 32768, 131072], min_length=1)
    passkey_depths: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9], min_length=1)
    passkey_trials: int = Field(10, gt=0, description="held-out prompts per (length, depth)")
    eval_batch_size: int = Field(8, gt=0, description="prompts (or rows) per forward pass in the evaluation")
    perplexity_lengths: list[int] = Field(default_factory=lambda: [4096, 32768, 131072], min_length=1)
    perplexity_tokens: int = Field(65536, gt=0, description="validation tokens scored per context length")
    val_every_n_steps: int = Field(50, gt=0)
    val_max_rows: int | None = Field(32, gt=0, description="validation rows per phase's validation (null = all)")
    checkpoint_every_n_steps: int = Field(25, gt=0, description="interval of each phase's `last` checkpoint")
    log_every_n_steps: int = Field(5, gt=0)

    @model_validator(mode="after")
    def _phases_grow(self) -> ExtendSection:
        lengths = [p.seq_len for p in self.phases]
        if lengths != sorted(set(lengths)):
            raise ValueError("extend.phases: seq_len must strictly grow from phase to phase")
        if not all(0 <= d <= 1 for d in self.passkey_depths):
            raise ValueError("extend.passkey_depths: depths are fractions in [0, 1]")
        return self


class ProblemsSection(Section):
    """The verifiable math problems a post-training stage draws (dsv3.data.math_tasks): how many, how hard."""

    train_problems: int = Field(500, gt=0, description="generated train problems")
    heldout_problems: int = Field(100, gt=0, description="held-out problems (never trained on)")
    problem_steps: int = Field(2, ge=1, description="difficulty: operations, or equation form (math_tasks)")
    max_operand: int = Field(20, ge=2, description="difficulty: largest number in a problem")
    problem_kinds: list[Literal["arithmetic", "linear"]] = Field(
        default_factory=lambda: ["arithmetic", "linear"], min_length=1, description="generated problem kinds"
    )


class SftSection(ProblemsSection):
    """Supervised fine-tuning (docs/paper.md, "Post-training"): 2 epochs, cosine LR 5e-6 → 1e-6, samples packed with
    sample masking, loss on assistant tokens only. Data: generated math problems with worked solutions, plus
    optional chat files; evaluation: greedy accuracy and format rate on held-out problems."""

    lr_peak: float = Field(5e-6, ge=0, le=1, description="LR at the start of the cosine (paper: 5e-6; 0 = evaluate only)")
    lr_final: float = Field(1e-6, ge=0, le=1, description="LR the cosine ends at (paper: 1e-6)")
    lr_warmup_fraction: float = Field(0.0, ge=0, lt=1, description="linear warm-up, fraction of the steps")
    epochs: int = Field(2, ge=1, description="passes over the SFT data (paper: 2)")
    per_device_batch_size: int = Field(
        2, gt=0, description="packed rows per step and device (padding-free: concatenated into one row)"
    )
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_seq_len: int = Field(4096, ge=16, description="packing length; longer samples are left out")
    train_problems: int = Field(2000, gt=0, description="generated math problems with worked solutions")
    heldout_problems: int = Field(200, gt=0, description="held-out problems for the accuracy evaluation")
    chat_data: list[str] = Field(
        default_factory=list, description='local jsonl files of {"messages": [...]} rows (paths from the working directory)'
    )
    eval_max_new_tokens: int = Field(256, gt=0, description="generation budget per held-out answer")
    eval_batch_size: int = Field(32, gt=0, description="prompts per generate call")
    bf16: bool = Field(False, description="bf16 autocast (TRL's default); false = fp32")
    activation_checkpointing: bool = Field(False, description="recompute activations in the backward pass")
    save_steps: int = Field(50, gt=0, description="checkpoint interval in optimizer steps")
    log_steps: int = Field(10, gt=0, description="metric logging interval in optimizer steps")

    @model_validator(mode="after")
    def _lr_decays(self) -> SftSection:
        if self.lr_final > self.lr_peak:
            raise ValueError("sft.lr_final: must be at most sft.lr_peak (the cosine decays)")
        return self


class RewardSection(ProblemsSection):
    """Reward model (docs/paper.md, "Post-training": trained from the SFT checkpoint on preference data): a scalar head
    on the SFT network, Bradley-Terry loss on pairs (chosen = the worked solution; rejected = a wrong final
    answer, a broken \\boxed{} format, or an SFT sample the rule judges wrong)."""

    lr: float = Field(1e-5, gt=0, le=1, description="peak LR (linear decay to 0)")
    epochs: int = Field(1, ge=1, description="passes over the train pairs")
    per_device_batch_size: int = Field(8, gt=0, description="pairs per step and device")
    sampled_problems: int = Field(
        100, ge=0, description="train problems the SFT model answers to find wrong samples (0 = none)"
    )
    samples_per_problem: int = Field(2, ge=1, description="SFT samples drawn per sampled problem")
    sample_temperature: float = Field(1.0, gt=0, description="sampling temperature of the SFT samples")
    max_new_tokens: int = Field(128, gt=0, description="generation budget per SFT sample")
    sample_batch_size: int = Field(32, gt=0, description="prompts per generate call")
    max_length: int = Field(512, ge=16, description="pairs with a longer side are left out")
    center_rewards_coefficient: float | None = Field(
        0.01, ge=0, description="weight of the mean-zero reward penalty (null = none)"
    )
    save_steps: int = Field(50, gt=0, description="checkpoint interval in optimizer steps")
    log_steps: int = Field(10, gt=0, description="metric logging interval in optimizer steps")


class RlSection(ProblemsSection):
    """GRPO (docs/paper.md, "Post-training"; DeepSeekMath: G = 64, β = 0.04, LR 1e-6): G sampled answers per prompt,
    advantage (r − mean r)/std r within each group, clipped ratio, k3 KL to the SFT model; rewards = rule-based
    correctness (math-verify on the last \\boxed{}), format, and the reward model's score, summed with weights."""

    lr: float = Field(1e-6, gt=0, le=1, description="constant LR (paper: 1e-6)")
    steps: int = Field(100, gt=0, description="optimizer steps")
    num_generations: int = Field(8, ge=2, description="group size G: completions per prompt")
    prompts_per_step: int = Field(4, gt=0, description="prompts per optimizer step (× G completions)")
    beta: float = Field(0.04, ge=0, description="KL coefficient β (k3 estimator against the SFT model)")
    epsilon: float = Field(0.2, gt=0, lt=1, description="clip ε of the probability ratio")
    num_iterations: int = Field(1, ge=1, description="policy updates per generated batch (μ)")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field(
        "grpo", description="grpo: the paper's per-sequence mean; others: TRL's length-debiased variants"
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="divide advantages by the group's std (paper), the batch's, or not at all"
    )
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts")
    max_completion_length: int = Field(128, gt=0, description="generation budget per rollout")
    correctness_weight: float = Field(1.0, ge=0, description="weight of the rule-based correctness reward")
    format_weight: float = Field(0.1, ge=0, description="weight of the format reward")
    reward_model_weight: float = Field(0.1, ge=0, description="weight of the reward model's score")
    eval_max_new_tokens: int = Field(128, gt=0, description="generation budget per held-out answer")
    eval_batch_size: int = Field(32, gt=0, description="prompts per generate call in the evaluation")
    eval_k: int = Field(4, ge=1, description="pass@k: k sampled answers per held-out problem")
    eval_temperature: float = Field(1.0, gt=0, description="sampling temperature for pass@k")
    save_steps: int = Field(25, gt=0, description="checkpoint interval in optimizer steps")
    log_steps: int = Field(1, gt=0, description="metric logging interval in optimizer steps")

    @model_validator(mode="after")
    def _some_reward(self) -> RlSection:
        if not self.correctness_weight + self.format_weight + self.reward_model_weight:
            raise ValueError("rl.correctness_weight: at least one reward weight must be positive")
        return self


class TokenizerChecks(Section):
    min_bytes_per_token: float = Field(1.5, ge=0, description="held-out bytes per token: a BPE that merges compresses")


class PretrainChecks(Section):
    max_val_loss_ratio: float = Field(
        1.0, gt=0, description="final validation loss ÷ the unigram baseline's: below 1 = learned more than counts"
    )
    min_induction_gain: float | None = Field(
        None, description="nats: first- minus second-copy loss of repeated random tokens (null = not checked)"
    )
    min_mtp_acceptance: float | None = Field(
        None, ge=0, le=1, description="share of MTP drafts accepted in greedy speculative decoding (null = not checked)"
    )


class ExtendChecks(Section):
    max_ppl_increase: float = Field(
        0.25, ge=0, description="relative perplexity change at the pretraining length, after vs before extension"
    )
    min_passkey_accuracy_4x: float | None = Field(
        None, ge=0, le=1, description="passkey accuracy after extension at 4x the pretraining length (null = not checked)"
    )


class SftChecks(Section):
    min_accuracy: float | None = Field(
        None, ge=0, le=1, description="held-out greedy accuracy (null = not checked)"
    )
    min_format_rate: float = Field(0.5, ge=0, le=1, description="held-out answers ending in one \\boxed{}")
    max_truncated_rate: float = Field(
        0.5, ge=0, le=1, description="held-out answers that used the whole generation budget"
    )


class RewardChecks(Section):
    min_pair_accuracy: float = Field(
        0.6, ge=0, le=1, description="held-out pairs ranked right (chance 0.5; 0.6 is 2 standard errors above it on 100 pairs)"
    )
    min_broken_format_accuracy: float | None = Field(
        None, ge=0, le=1, description="held-out pairs whose rejected answer breaks \\boxed{} ranked right (null = not checked)"
    )


class RlChecks(Section):
    max_truncated_rate: float = Field(
        0.95, ge=0, le=1, description="rollouts that used the whole completion budget, mean over the run"
    )


class StageSchema(NamedTuple):
    """What a recipe says about one stage: its own section and the thresholds of its health checks (None: a
    registered stage without them)."""

    section: type[Section] | None
    checks: type[Section] | None
    on_by_default: bool = False  # the section is there unless the recipe sets it null (else null until it is set)


# The built-in stages' recipe schema, in pipeline order, kept here (pydantic and yaml only) so that reading a recipe
# or `dsv3 --help` imports no stage module (they import torch). Everything else about a stage — its sections, inputs,
# outputs, how its checks are measured, headline metrics and run — its module declares (`STAGE = Stage(...)` in
# dsv3/stages/<name>.py). A stage declared outside dsv3 carries its section and checks in its `Stage` and joins the
# schema when registered (add_stage_schema; docs/design.md, "Stages").
STAGES: dict[str, StageSchema] = {
    "tokenizer": StageSchema(TokenizerSection, TokenizerChecks, on_by_default=True),
    "pretrain": StageSchema(PretrainSection, PretrainChecks),
    "extend": StageSchema(ExtendSection, ExtendChecks),
    "sft": StageSchema(SftSection, SftChecks),
    "reward": StageSchema(RewardSection, RewardChecks),
    "rl": StageSchema(RlSection, RlChecks),
}
STAGE_ORDER = tuple(STAGES)
REGISTERED: dict[str, StageSchema] = {}  # stages declared outside dsv3/stages/ (dsv3.stages.register)


def stage_order() -> tuple[str, ...]:
    """Every stage a recipe may name, in order: STAGE_ORDER, then the registered ones (installed plugins' included)."""
    from dsv3.stages import discover  # imports no built-in stage (torch)

    discover()
    return STAGE_ORDER + tuple(REGISTERED)


class ChecksBase(Section):
    enforce: bool = Field(
        True, description="false: a failed check is recorded and shown everywhere, and the pipeline goes on"
    )


def _checks_section() -> type[ChecksBase]:
    return create_model(
        "ChecksSection",
        __base__=ChecksBase,
        __doc__="""Health checks a stage must pass to count as completed (dsv3.store.health): checks.<stage> of each
        stage of STAGES and REGISTERED. Every stage also needs finite losses. Not part of any stage's key: changing a
        threshold re-judges a finished stage without rerunning it.""",
        **{
            name: (schema.checks, Field(default_factory=schema.checks))
            for name, schema in {**STAGES, **REGISTERED}.items()
            if schema.checks
        },
    )


ChecksSection = _checks_section()


class PipelineSection(Section):
    """How the Prefect flow runs the stages."""

    stages: list[str] = Field(default_factory=lambda: ["tokenizer"], description="the stages to run, in order")
    retries: int = Field(0, ge=0, le=10, description="Prefect task retries per stage")
    retry_delay_s: float = Field(5.0, ge=0)

    @model_validator(mode="after")
    def _stages_in_recipe_order(self) -> PipelineSection:
        order = stage_order()
        unknown = [s for s in self.stages if s not in order]
        if unknown:
            raise ValueError(f"pipeline.stages: {unknown[0]} is not a stage (stages: {', '.join(order)})")
        indices = [order.index(s) for s in self.stages]
        if indices != sorted(set(indices)):
            raise ValueError(f"pipeline.stages: must be distinct and in the order {', '.join(order)}")
        return self


class RecipeBase(Section):
    """What a recipe holds besides the stages' own sections (Recipe adds those from STAGES and REGISTERED)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="letters, digits, _ . -")
    variant: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$",
        description="the run's folder runs/<name>/<variant> (dsv3 run --name); null = named by the overrides",
    )
    overrides: list[str] = Field(default_factory=list, description="the --set items this recipe was loaded with")
    seed: int = Field(0, ge=0)
    pipeline: PipelineSection = Field(default_factory=PipelineSection)
    checks: ChecksSection = Field(default_factory=ChecksSection)
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection | None = None

    @model_validator(mode="after")
    def _fits_the_processes(self) -> RecipeBase:
        """The routed experts split evenly over expert_parallel ranks; every extension phase (it runs on the
        pretraining's processes and strategy) splits its batch evenly over them."""
        pretrain, extend = getattr(self, "pretrain", None), getattr(self, "extend", None)  # Recipe's, from STAGES
        if not pretrain:
            return self
        if self.model and self.model.n_routed_experts % pretrain.expert_parallel:
            raise ValueError(
                f"pretrain.expert_parallel: {pretrain.expert_parallel} must divide model.n_routed_experts "
                f"({self.model.n_routed_experts})"
            )
        ranks = pretrain.devices * pretrain.num_nodes
        for i, phase in enumerate(extend.phases if extend else [], start=1):
            if phase.global_batch_size % (phase.micro_batch_size * ranks):
                raise ValueError(
                    f"extend.phases: phase {i}'s global_batch_size ({phase.global_batch_size}) must be a multiple of "
                    f"micro_batch_size × pretrain.devices × pretrain.num_nodes ({phase.micro_batch_size * ranks}): "
                    "extension runs on the pretraining's processes"
                )
        return self

    def section_hash(self, *names: str) -> str:
        """sha256 over the named sections (and the seed) less their HARDWARE settings: the key a stage's manifest
        is matched on."""
        payload = {"seed": self.seed, **{n: without_hardware(n, _dump(getattr(self, n))) for n in names}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _recipe(checks: type[ChecksBase]) -> type[RecipeBase]:
    return create_model(
        "Recipe",
        __base__=RecipeBase,
        __doc__="A whole recipe: a name (the run folder under runs/), a seed, the shared sections and one section per stage.",
        checks=(checks, Field(default_factory=checks)),
        **{
            name: (schema.section, Field(default_factory=schema.section)) if schema.on_by_default else (schema.section | None, None)
            for name, schema in {**STAGES, **REGISTERED}.items()
            if schema.section
        },
    )


Recipe = _recipe(ChecksSection)


def add_stage_schema(name: str, schema: StageSchema) -> None:
    """Add (or replace) the schema of a stage declared outside dsv3/stages/ (dsv3.stages.register): its name after
    the built-in stages, its section `<name>:` and its thresholds `checks.<name>:`. Rebuilds Recipe and ChecksSection:
    read them as `config.Recipe`, not imported by value."""
    if name in STAGES or name in RecipeBase.model_fields:
        raise ValueError(f"stage {name!r}: taken by a built-in stage or recipe key; name it otherwise")
    for part in (schema.section, schema.checks):
        if part is not None and not (isinstance(part, type) and issubclass(part, Section)):
            raise ValueError(f"stage {name!r}: its section and checks must be Section classes, got {part!r}")
    REGISTERED[name] = schema
    _rebuild()


def remove_stage_schema(name: str) -> None:
    """Take a registered stage's schema away again."""
    if REGISTERED.pop(name, None) is not None:
        _rebuild()


def _rebuild() -> None:
    global ChecksSection, Recipe
    ChecksSection = _checks_section()
    Recipe = _recipe(ChecksSection)


# Settings that decide where and how a run computes, not what it computes (the same global batch, the same loss up
# to float reassociation): out of stage keys and variant names, so a stage stopped on 2 processes resumes on 1
# through `dsv3 run` and the other way round. extend's phases are matched by their micro_batch_size alone.
HARDWARE = {
    "pretrain": (
        "devices", "num_nodes", "strategy", "expert_parallel", "compile", "micro_batch_size", "accelerator", "max_restarts",
        "fsdp_replicate", "gradient_sync", "activation_checkpointing", "activation_checkpointing_every",
    ),
    "extend": ("micro_batch_size",),
}


def is_hardware(key: str) -> bool:
    """True for a dotted recipe key of a HARDWARE setting (`pretrain.devices`, `extend.phases.0.micro_batch_size`)."""
    parts = key.split(".")
    return len(parts) > 1 and parts[-1] in HARDWARE.get(parts[0], ())


def without_hardware(name: str, dumped: Any) -> Any:
    """A section's dump (model_dump) less its HARDWARE settings, at any depth (extend's phases)."""
    if isinstance(dumped, dict):
        return {k: without_hardware(name, v) for k, v in dumped.items() if k not in HARDWARE.get(name, ())}
    if isinstance(dumped, list):
        return [without_hardware(name, v) for v in dumped]
    return dumped


def _dump(section: Any) -> Any:
    return section.model_dump(mode="json") if isinstance(section, BaseModel) else section


# ---------------------------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), variant: str | None = None) -> Recipe:
    """Read a recipe file (following `base:` chains), apply `key=value` overrides and validate it; `variant` names
    the run's folder (else the overrides do, see dsv3.store.runs)."""
    raw = _read_with_bases(Path(path), seen=())
    for item in overrides:
        _apply_override(raw, item)
    raw["overrides"] = list(overrides)
    if variant is not None:
        raw["variant"] = variant
    return validate_recipe(raw)


# Settings that had two homes and now have one: an old recipe that sets the removed one is told where it went.
MOVED = {
    ("model", "rope_scaling"): "YaRN is set by the extend section (extend.factor, beta_fast, beta_slow, mscale, "
    "mscale_all_dim) when the extend stage switches the pretrained model to it",
    ("pretrain", "aux_alpha"): "set model.aux_loss_alpha instead (the α of the balance loss; the aux_loss baseline "
    "uses 1e-3, see recipes/ablations/aux-loss.yaml)",
}


def validate_recipe(raw: dict[str, Any]) -> Recipe:
    from dsv3.stages import discover  # imports no built-in stage (torch)

    discover()  # the `dsv3.stages` entry points, once
    for (section, key), where in MOVED.items():
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raise RecipeError(f"{section}.{key}: moved — {where}")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(_one_line(err)) from None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; used for MLflow params and error messages."""
    if isinstance(tree, BaseModel):
        tree = tree.model_dump(mode="json")
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, dict | BaseModel) else {name: value})
    return out


def _read_with_bases(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise RecipeError(f"base: recipe {path.name} builds on itself ({' -> '.join(p.name for p in seen)})")
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path} (pass an existing recipes/*.yaml)")
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text (byte {err.start}); save the recipe as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path.name}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path.name}: a recipe is a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise RecipeError(f"base: must be a file name relative to {path.parent}, got {base!r}")
    return _deep_merge(_read_with_bases(path.parent / base, seen + (path,)), raw)


def _deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (so 3, 1e-3, true, null, [1,2])."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {item!r}: expected key=value, e.g. --set pretrain.lr_peak=3e-4")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def load_yaml_model(path: str | Path, schema: type[BaseModel], hint: str) -> Any:
    """A YAML file validated against `schema` (a recipe-like file of another shape: a probe's); RecipeError with one
    line naming the key. `hint` says what file to pass when it is missing."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return schema.model_validate(raw)
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path} ({hint})") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path.name}: not valid YAML: {err}") from None
    except ValidationError as err:
        raise RecipeError(f"{path.name}: {_one_line(err, schema)}") from None


def _one_line(err: ValidationError, schema: type[BaseModel] | None = None) -> str:
    """The first validation error as `dotted.key: what is allowed (got value)`."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    kind, msg = first["type"], first["msg"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(first["loc"][:-1], schema or Recipe)
        return f"{loc}: unknown key (allowed: {', '.join(allowed)})"
    if kind == "missing":
        return f"{loc}: required key is missing"
    msg = msg.removeprefix("Value error, ")
    if re.match(r"^[\w.]+: ", msg):  # a validator that already names its dotted key
        return msg
    got = first.get("input")
    shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
    return f"{loc or 'recipe'}: {msg}{shown}"


def _allowed_keys(loc: tuple[Any, ...], model: Any) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part)) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = _section_type(field.annotation)
    return sorted(model.model_fields) if hasattr(model, "model_fields") else []


def _section_type(annotation: Any) -> Any:
    for candidate in getattr(annotation, "__args__", (annotation,)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return annotation
