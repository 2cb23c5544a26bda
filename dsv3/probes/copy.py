"""The copy/retrieval probe (recipes/probes/copy.yaml): the two skills passkey retrieval is made of, where 2 CPU cores
can show them, then YaRN against plain RoPE past the training length.

1. Pretraining with the loop (dsv3.train.fit) on synthetic rows (dsv3.data.probes): copy rows (a random segment
   written twice) and key-value rows (stored pairs, queries at the end; train keys only). It runs in
   `probe.checkpoints` segments of one constant-LR run, and after each the model is measured — so the induction gain
   is seen rising over training. The first `probe.copy_only_segments` segments train on copy rows alone: mixed in
   from the start, the key-value rows delay the induction heads by hundreds of steps (measured at LR 3e-3: 80% copy
   rows reached a gain of 0.01 nats at step 300, copy rows alone 0.96).
2. Measured at the training length L and at `extension_factor`·L: the induction gain on repeated random sequences
   (dsv3.eval.induction: first-copy minus second-copy loss, ≈ 0 without copying, up to ≈ ln of the symbol count)
   and greedy exact-match retrieval of held-out keys (dsv3.eval.retrieval), for four models —
   plain RoPE as pretrained; YaRN (factor s = extension_factor, the extend section's β and mscale) switched on
   without training; and each of the two trained for the extend section's phase on rows of the longer length
   (YaRN: the paper's recipe; plain RoPE: the control).

The result (result.json, copy.md, curves.png) lies in the probe's folder with its key (recipe and code); a rerun with
the same key reads it back instead of training.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from pydantic import Field, model_validator

from dsv3.config import ExtendSection, ModelSection, PretrainSection, Section, load_yaml_model
from dsv3.data.probes import ProbeVocab, probe_rows, retrieval_prompts
from dsv3.eval.induction import copy_losses, repeated_random_rows
from dsv3.eval.retrieval import retrieval_accuracy
from dsv3.io import write_json_atomic
from dsv3.model import DSV3Config, DSV3ForCausalLM
from dsv3.model.rope import yarn_config
from dsv3.plotting import plt
from dsv3.store.keyed import key_of, reuse_or_compute
from dsv3.train import LoopSettings, fit

RESULT, REPORT, PLOT = "result.json", "copy.md", "curves.png"
VARIANTS = ("plain RoPE", "YaRN, no training", "plain RoPE, trained at 4x", "YaRN, trained at 4x")


class ProbeSection(Section):
    """The synthetic rows (dsv3.data.probes) and the measurements."""

    key_symbols: int = Field(16, ge=2, description="key alphabet size (a key is key_tokens of them)")
    value_symbols: int = Field(16, ge=2, description="value alphabet size")
    filler_symbols: int = Field(29, ge=2, description="filler alphabet size")
    seq_len: int = Field(128, ge=32, description="training length L")
    train_rows: int = Field(20000, gt=0, description="distinct training rows (the loop cycles through them)")
    copy_fraction: float = Field(0.5, ge=0, le=1, description="share of copy rows; the rest are key-value rows")
    min_segment_share: float = Field(
        0.375, gt=0, le=0.5, description="a copy row's shortest copied segment, as a share of the row (longest: half)"
    )
    pairs: int = Field(4, ge=1, description="stored pairs per key-value row")
    queries: int = Field(2, ge=1, description="queries at the end of a training key-value row")
    key_tokens: int = Field(2, ge=1)
    value_tokens: int = Field(3, ge=1)
    extension_factor: int = Field(4, ge=2, description="the longer evaluation length is this times L")
    eval_rows: int = Field(64, gt=0, description="rows per measurement (repeated sequences; held-out key-value rows)")
    eval_batch_size: int = Field(16, gt=0)
    checkpoints: int = Field(4, ge=1, description="pretraining segments, each followed by a measurement at L")
    copy_only_segments: int = Field(
        0, ge=0, description="the first segments train on copy rows only (induction forms first), the rest on both kinds"
    )

    def vocab(self) -> ProbeVocab:
        return ProbeVocab(self.key_symbols, self.value_symbols, self.filler_symbols)

    def kv(self) -> dict[str, int]:
        return {"pairs": self.pairs, "queries": self.queries, "key_tokens": self.key_tokens, "value_tokens": self.value_tokens}


class CopyProbeRecipe(Section):
    """recipes/probes/copy.yaml: the rows, the model (vocab_size null = the probe's vocabulary), the pretraining (a
    constant LR without warm-up, so its segments add up to one run) and the extension (factor, β, mscale, LR and
    one phase at extension_factor·L)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = Field(0, ge=0)
    probe: ProbeSection = Field(default_factory=ProbeSection)
    model: ModelSection
    pretrain: PretrainSection
    extend: ExtendSection

    @model_validator(mode="after")
    def _consistent(self) -> CopyProbeRecipe:
        p = self.pretrain
        if p.steps is None or p.steps % self.probe.checkpoints:
            raise ValueError(f"pretrain.steps: set steps (not tokens), a multiple of probe.checkpoints ({self.probe.checkpoints})")
        if p.lr_warmup_fraction or min(p.lr_decay_start_fraction, p.bias_update_switch_fraction, p.mtp_lambda_switch_fraction) < 1:
            raise ValueError(
                "pretrain.lr_warmup_fraction: the probe trains in segments of one run, so every schedule must be constant: "
                "lr_warmup_fraction 0 and lr_decay_start, bias_update_switch, mtp_lambda_switch fractions 1"
            )
        if (p.steps // self.probe.checkpoints) % p.checkpoint_every_n_steps:
            raise ValueError(
                f"pretrain.checkpoint_every_n_steps: must divide a segment's {p.steps // self.probe.checkpoints} steps "
                "(each segment resumes from the last checkpoint)"
            )
        q = self.probe
        if q.copy_only_segments >= q.checkpoints:
            raise ValueError(
                f"probe.copy_only_segments: at most probe.checkpoints - 1 ({q.checkpoints - 1}), so that key-value rows are trained on"
            )
        if (q.pairs + q.queries) * (1 + q.key_tokens + q.value_tokens) > q.seq_len or q.queries > q.pairs:
            raise ValueError("probe.seq_len: a key-value row must hold the pairs and the queries (queries <= pairs)")
        longer = self.probe.extension_factor * self.probe.seq_len
        if [phase.seq_len for phase in self.extend.phases] != [longer]:
            raise ValueError(f"extend.phases: one phase at probe.extension_factor x probe.seq_len = {longer} tokens")
        if self.model.vocab_size not in (None, self.probe.vocab().size):
            raise ValueError(f"model.vocab_size: null (the probe's {self.probe.vocab().size} tokens)")
        if self.model.max_position_embeddings < self.probe.seq_len:
            raise ValueError(f"model.max_position_embeddings: at least probe.seq_len ({self.probe.seq_len})")
        return self


def load_copy_recipe(path: str | Path) -> CopyProbeRecipe:
    """Read and validate recipes/probes/copy.yaml; RecipeError with one line naming the key."""
    return load_yaml_model(path, CopyProbeRecipe, "pass recipes/probes/copy.yaml")


def probe_key(recipe: CopyProbeRecipe) -> str:
    """The key of the probe's result: its recipe and the code it computes with (dsv3.store.keyed)."""
    return key_of(recipe.model_dump(mode="json"), code=sys.modules[__name__])


def model_config(recipe: CopyProbeRecipe) -> DSV3Config:
    return recipe.model.config(recipe.probe.vocab().size, bos_token_id=None, eos_token_id=None, pad_token_id=0)


def extended_config(config: DSV3Config, recipe: CopyProbeRecipe) -> DSV3Config:
    """The config with YaRN over the training length L, declared for the longer length."""
    ext = recipe.extend
    return yarn_config(
        config, original_length=recipe.probe.seq_len, max_length=ext.phases[0].seq_len, factor=ext.factor,
        beta_fast=ext.beta_fast, beta_slow=ext.beta_slow, mscale=ext.mscale, mscale_all_dim=ext.mscale_all_dim,
    )  # fmt: skip


def rows_dataset(ids: np.ndarray) -> datasets.Dataset:
    """The loop's packed-rows format: input_ids and position_ids (0..T−1) per row, both of fixed length T."""
    positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape).copy()
    row = datasets.List(datasets.Value("int32"), length=ids.shape[1])
    features = datasets.Features({"input_ids": row, "position_ids": row})
    return datasets.Dataset.from_dict({"input_ids": ids, "position_ids": positions}, features=features)


def measure(model, recipe: CopyProbeRecipe, length: int) -> dict[str, float]:
    """Induction gain (and both copies' losses) on repeated random sequences, and held-out retrieval accuracy, at
    `length` tokens; every row is drawn from its own seed, the same for every model."""
    p = recipe.probe
    vocab = p.vocab()
    copying = copy_losses(model, repeated_random_rows(vocab.symbols, p.eval_rows, length // 2, recipe.seed + 10_000), p.eval_batch_size)
    prompts = retrieval_prompts(vocab, p.eval_rows, length, recipe.seed, "heldout", **p.kv())
    return copying | {"retrieval_accuracy": retrieval_accuracy(model, prompts, p.eval_batch_size)}


def run(recipe: CopyProbeRecipe, workdir: Path, logger_factory=None, log=print) -> dict[str, Any]:
    """Train and measure (see the module docstring) in `workdir`, or read the result of an earlier run with the same
    key; returns the result ({"key", "training": [...], "variants": {...}, "seconds", ...}). logger_factory: a
    callable giving a Lightning logger for each training (or None); log: progress lines."""
    workdir = Path(workdir)
    return reuse_or_compute(
        workdir / RESULT, probe_key(recipe), lambda: train_and_measure(recipe, workdir, logger_factory, log),
        log=lambda line: log(f"copy probe: {line}"),
    )


def train_and_measure(recipe: CopyProbeRecipe, workdir: Path, logger_factory, log) -> dict[str, Any]:
    """The probe's training and measurements in `workdir` (the module docstring): its result."""
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    p, seed = recipe.probe, recipe.seed
    vocab = p.vocab()
    (workdir / "vocab").mkdir(exist_ok=True)
    write_json_atomic(workdir / "vocab" / "probe_vocab.json", {"size": vocab.size} | p.model_dump(mode="json"))
    token_bytes = torch.ones(vocab.size)
    config = model_config(recipe)
    long = p.extension_factor * p.seq_len

    train = rows_dataset(probe_rows(vocab, p.train_rows, p.seq_len, seed, p.copy_fraction, p.min_segment_share, **p.kv()))
    val = rows_dataset(probe_rows(vocab, 256, p.seq_len, seed + 1, p.copy_fraction, p.min_segment_share, **p.kv()))
    settings = LoopSettings.from_pretrain(recipe.pretrain)
    torch.manual_seed(seed)
    training = [{"step": 0, **measure(DSV3ForCausalLM(config), recipe, p.seq_len)}]  # the initialisation fit() draws
    log(f"copy probe: step 0: induction gain {training[-1]['induction_gain']:.3f} nats")
    segment = settings.steps // p.checkpoints
    copy_only = (
        rows_dataset(probe_rows(vocab, p.train_rows, p.seq_len, seed + 4, 1.0, p.min_segment_share, **p.kv()))
        if p.copy_only_segments else None
    )  # fmt: skip
    for k in range(1, p.checkpoints + 1):
        result = fit(
            settings.model_copy(update={"steps": k * segment}), config, copy_only if k <= p.copy_only_segments else train, val, workdir / "pretrain", seed, token_bytes,
            workdir / "pretrain" / "model", workdir / "vocab", logger=logger_factory() if logger_factory else False,
        )
        training.append({"step": k * segment, **measure(result.model, recipe, p.seq_len)})
        log(f"copy probe: step {k * segment}: induction gain {training[-1]['induction_gain']:.3f} nats, "
            f"retrieval {training[-1]['retrieval_accuracy']:.0%}")
    history = result.history
    pretrained = result.model.state_dict()

    long_train = rows_dataset(probe_rows(vocab, max(2000, p.train_rows // (4 * p.extension_factor)), long, seed + 2, p.copy_fraction, p.min_segment_share, **p.kv()))
    long_val = rows_dataset(probe_rows(vocab, 64, long, seed + 3, p.copy_fraction, p.min_segment_share, **p.kv()))
    phase = recipe.extend.phases[0]
    variants = {}
    for name, yarn, train_long in zip(VARIANTS, (False, True, False, True), (False, False, True, True), strict=True):
        cfg = extended_config(config, recipe) if yarn else replace_max_positions(config, long)
        if train_long:
            folder = workdir / ("extend-yarn" if yarn else "extend-rope")
            model = fit(
                LoopSettings.for_extension(recipe.pretrain, recipe.extend, phase), cfg, long_train, long_val, folder,
                seed + 1, token_bytes, folder / "model", workdir / "vocab", initial_weights=pretrained,
                logger=logger_factory() if logger_factory else False,
            ).model
        else:
            model = DSV3ForCausalLM(cfg)
            model.load_state_dict(pretrained)
        variants[name] = {str(length): measure(model, recipe, length) for length in (p.seq_len, long)}
        log(f"copy probe: {name}: " + ", ".join(
            f"L={length}: gain {v['induction_gain']:.2f}, retrieval {v['retrieval_accuracy']:.0%}" for length, v in variants[name].items()))
    result = {
        "name": recipe.name, "seq_len": p.seq_len, "long": long, "log_vocab": math.log(len(vocab.symbols)),
        "training": training, "history": history, "variants": variants, "seconds": time.perf_counter() - started,
        "steps": settings.steps, "tokens": settings.steps * settings.global_batch_size * p.seq_len,
        "extension_steps": LoopSettings.for_extension(recipe.pretrain, recipe.extend, phase).steps,
    }  # fmt: skip
    plot(result, workdir / PLOT)
    (workdir / REPORT).write_text(markdown(result, PLOT), encoding="utf-8")
    return result


def replace_max_positions(config: DSV3Config, length: int) -> DSV3Config:
    """The same plain-RoPE config, declared long enough for `length` (RoPE itself has no limit)."""
    fields = config.to_dict()
    fields["max_position_embeddings"] = max(config.max_position_embeddings, length)
    return DSV3Config.from_dict(fields)


def markdown(result: dict[str, Any], plot_name: str | None = PLOT) -> str:
    """The probe's tables: induction gain and retrieval over training at L; the four models at L and at 4L."""
    L, long = result["seq_len"], result["long"]
    lines = [
        f"Pretraining: {result['steps']} steps, {result['tokens'] / 1e6:.2f}M tokens of length {L}; "
        f"extension: {result['extension_steps']} steps at length {long}; {result['seconds'] / 60:.1f} min in all. "
        f"Induction gain = first-copy − second-copy loss on repeated random sequences (0 = no copying; at most "
        f"≈ ln {round(math.exp(result['log_vocab']))} = {result['log_vocab']:.2f} nats); retrieval = greedy exact match "
        "of a held-out key's value.",
        "",
        "| step | induction gain (nats) | second-copy loss | retrieval at L |",
        "|--:|--:|--:|--:|",
        *(f"| {r['step']} | {r['induction_gain']:.3f} | {r['second_copy_loss']:.3f} | {r['retrieval_accuracy']:.0%} |"
          for r in result["training"]),
        "",
        f"| model | induction gain at {L} | at {long} | retrieval at {L} | at {long} |",
        "|---|--:|--:|--:|--:|",
    ]  # fmt: skip
    for name, v in result["variants"].items():
        a, b = v[str(L)], v[str(long)]
        lines.append(
            f"| {name} | {a['induction_gain']:.3f} | {b['induction_gain']:.3f} | {a['retrieval_accuracy']:.0%} | "
            f"{b['retrieval_accuracy']:.0%} |"
        )
    if plot_name:
        lines += ["", f"![copy probe]({plot_name})"]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    """Induction gain and retrieval at L against the pretraining step (left); training loss (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in result["training"]]
    left.plot(steps, [r["induction_gain"] for r in result["training"]], "o-", label="induction gain (nats)")
    left.axhline(1.0, color="grey", linestyle=":", linewidth=0.8)
    left.set_xlabel("optimizer step")
    left.set_ylabel("nats")
    twin = left.twinx()
    twin.plot(steps, [r["retrieval_accuracy"] for r in result["training"]], "s--", color="C1", label="held-out retrieval")
    twin.set_ylim(0, 1.05)
    twin.set_ylabel("exact-match accuracy")
    lines = left.get_lines()[:1] + twin.get_lines()
    left.legend(lines, [line.get_label() for line in lines], loc="upper left", fontsize=8)
    left.set_title(f"Copy probe at the training length {result['seq_len']}")
    points = sorted({r["step"]: r["train/ce"] for r in result["history"] if "train/ce" in r}.items())
    right.plot([s for s, _ in points], [v for _, v in points], label="training loss")
    vals = sorted({r["step"]: r["val/loss"] for r in result["history"] if "val/loss" in r}.items())
    right.plot([s for s, _ in vals], [v for _, v in vals], "o", label="validation loss")
    right.set_xlabel("optimizer step")
    right.set_ylabel("cross-entropy (nats/token)")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
