"""Pretraining stage (docs/paper.md, "Pretraining", "Balancing", "Multi-token prediction").

FIM-augmented, packed rows of the training split (dsv3.data.build_lm_dataset, cached under runs/<recipe>/cache)
train DSV3ForCausalLM with the training loop (dsv3.train.fit): loss = CE + λ·MTP + the sequence-wise balance loss,
AdamW, the paper's schedules in fractions of the run's tokens, and loss-free balancing (or the auxiliary-loss
baseline). Validation uses the plain validation split (no FIM, no token splitting) for loss, bits per byte and the
global MaxVio. Metrics go to the stage's MLflow run through Lightning's MLFlowLogger.

Checkpoints: `checkpoints/last.ckpt` every checkpoint_every_n_steps (the one before kept as previous.ckpt),
`checkpoints/best.ckpt` at the lowest validation loss. A rerun of a killed stage resumes from last.ckpt: weights,
optimizer, router biases, the step (hence the schedules and the data position) and the metric history. A diverged
loss stops the stage (TrainingDiverged); after a fix to the pretrain section, a rerun resumes from the last
checkpoint (its tunable section). devices × num_nodes > 1 trains in a torchrun subprocess (dsv3.train.launch).

Output: `model/` — a save_pretrained directory with the tokenizer files next to it, so AutoTokenizer and
AutoModelForCausalLM load it from one folder.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from lightning.pytorch.loggers import MLFlowLogger
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from dsv3.config import Recipe
from dsv3.data.corpus import corpus_source, recipe_corpus, recipe_data_files
from dsv3.data.dataset import build_lm_dataset
from dsv3.data.mixture import mixture_rows
from dsv3.data.tokenizer import BOS, EOS, PAD, load_tokenizer, token_byte_lengths
from dsv3.eval.acceptance import acceptance_prompts, mtp_acceptance, teacher_forced_acceptance
from dsv3.eval.induction import copy_losses, copy_probe_rows
from dsv3.io import write_json_atomic
from dsv3.model import DSV3Config, DSV3ForCausalLM
from dsv3.store import Stage, StageData, StageResult, metric, ratio
from dsv3.store.health import NONFINITE, count_nonfinite, logged_losses
from dsv3.store.runs import shared_cache
from dsv3.tracking import stage_run
from dsv3.train import FitResult, LoopSettings, fit
from dsv3.train.data import validation_subset
from dsv3.train.launch import inside_torchrun, launch_torchrun
from dsv3.train.plots import plot_expert_load, plot_losses, plot_max_violation
from dsv3.train.schedules import step_plan

OUTPUT = "model"
COPY_LENGTH = 64  # the copying probe's sequences: 16 of 64 random tokens, each repeated
ACCEPTANCE_PROMPTS = (16, 32)  # prompts, tokens each
ACCEPTANCE_NEW_TOKENS = 32
CHECKPOINTS = "checkpoints"
RESULT = "train_result.json"
RANKS = "ranks"


def data_files(recipe: Recipe) -> list[str]:
    """Local corpus files (their content is part of the stage's key)."""
    return recipe_data_files(recipe.data)


def run(recipe: Recipe, workdir: Path, inputs: dict[str, Path]) -> StageResult:
    check_recipe(recipe)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(inputs["tokenizer"] / "tokenizer")
    rows = lm_datasets(recipe, tokenizer, workdir)  # built once here, loaded by every rank
    started = time.perf_counter()
    settings = LoopSettings.from_pretrain(recipe.pretrain)
    if settings.world_size > 1 and not inside_torchrun():
        launch_torchrun(recipe, workdir, inputs, settings.devices, settings.num_nodes, entry=train_rank)
    else:
        train_rank(recipe, workdir, inputs)
    seconds = time.perf_counter() - started
    result = json.loads((workdir / RESULT).read_text())
    return stage_result(recipe, workdir, result, rows, tokenizer, seconds)


def check_recipe(recipe: Recipe) -> None:
    if recipe.model is None or recipe.pretrain is None:
        raise ValueError("the pretrain stage needs `model:` and `pretrain:` sections in the recipe")
    if recipe.data.seq_len > recipe.model.max_position_embeddings:
        raise ValueError(
            f"data.seq_len ({recipe.data.seq_len}) exceeds model.max_position_embeddings "
            f"({recipe.model.max_position_embeddings}): lower one or raise the other"
        )


@dataclass
class PretrainRows:
    """The rows pretraining reads: `train` (with a data.mixture, the whole run's rows in training order), the plain
    validation rows of the corpus, the corpus' own training rows (the unigram baseline's counts) and the rows each
    mixture source packs into."""

    train: datasets.Dataset
    validation: datasets.Dataset
    corpus_train: datasets.Dataset
    source_rows: dict[str, int]
    validation_texts: list[str]

    @property
    def in_order(self) -> bool:
        return len(self.source_rows) > 1


def lm_datasets(recipe: Recipe, tokenizer: Tokenizer, workdir: Path) -> PretrainRows:
    """Packed training rows (the corpus with FIM and punctuation splitting at the recipe's rates, blended with the
    generated sources of data.mixture) and plain validation rows of the corpus."""
    corpus = recipe_corpus(recipe.data)
    cache = shared_cache(workdir)
    data = recipe.data
    corpus_rows = build_lm_dataset(
        corpus["train"], tokenizer, data.seq_len, data.fim_rate, data.split_punctuation_rate, recipe.seed, cache
    )
    val_rows = build_lm_dataset(corpus["validation"], tokenizer, data.seq_len, 0.0, 0.0, recipe.seed, cache)
    if len(val_rows) == 0:
        raise ValueError("the validation split packs into no full row: raise data.validation_fraction or lower data.seq_len")
    if not data.mixture:
        return PretrainRows(corpus_rows, val_rows, corpus_rows, {"corpus": len(corpus_rows)}, corpus["validation"]["text"])
    plan = step_plan(LoopSettings.from_pretrain(recipe.pretrain), data.seq_len)
    train_rows, source_rows = mixture_rows(
        data.mixture, corpus_rows, corpus["train"]["text"], tokenizer, data.seq_len, plan.rows_before(plan.steps), recipe.seed, cache
    )
    return PretrainRows(train_rows, val_rows, corpus_rows, source_rows, corpus["validation"]["text"])


def model_config(recipe: Recipe, tokenizer: Tokenizer) -> DSV3Config:
    """DSV3Config of the recipe's model section with the tokenizer's vocabulary (vocab_size null) and token ids."""
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    size = recipe.model.vocab_size or vocab
    if size < vocab:
        raise ValueError(f"model.vocab_size ({size}) is below the tokenizer's {vocab}: set it to null")
    return recipe.model.config(
        size,
        bos_token_id=tokenizer.token_to_id(BOS),
        eos_token_id=tokenizer.token_to_id(EOS),
        pad_token_id=tokenizer.token_to_id(PAD),
    )


def train_rank(recipe: Recipe, workdir: Path, inputs: dict[str, Path]) -> None:
    """Train in this process — one rank of a torchrun job, or the only process — resuming from last.ckpt; rank 0
    saves the model and the run's result, every rank its router biases (to check they agree)."""
    tokenizer_dir = inputs["tokenizer"] / "tokenizer"
    tokenizer = load_tokenizer(tokenizer_dir)
    rows = lm_datasets(recipe, tokenizer, workdir)
    config = model_config(recipe, tokenizer)
    tracking = stage_run()
    result = fit(
        LoopSettings.from_pretrain(recipe.pretrain),
        config,
        rows.train,
        rows.validation,
        workdir,
        recipe.seed,
        token_byte_lengths(tokenizer, config.vocab_size),
        workdir / OUTPUT,
        tokenizer_dir,
        keep_best=True,
        rows_in_order=rows.in_order,
        logger=MLFlowLogger(tracking_uri=tracking[0], run_id=tracking[1]) if tracking else False,
    )
    biases = [gate.e_score_correction_bias.tolist() for gate in result.model.moe_gates()]
    (workdir / RANKS).mkdir(parents=True, exist_ok=True)
    write_json_atomic(workdir / RANKS / f"rank{result.rank}.json", {"router_bias": biases})
    if result.rank == 0:
        write_result(workdir / RESULT, result)


def write_result(path: Path, result: FitResult) -> None:
    write_json_atomic(
        path,
        {
            "history": result.history,
            "val_expert_load": result.val_expert_load.tolist() if result.val_expert_load is not None else None,
            "gate_labels": gate_labels(result.model),
            "resumed_from_step": result.resumed_from_step,
            "steps": result.steps,
            "tokens": result.tokens,
            "parameters": sum(p.numel() for p in result.model.parameters()),
        },
    )


def gate_labels(model) -> list[str]:
    config = model.config
    main = [f"layer {i}" for i in range(config.first_k_dense_replace, config.num_hidden_layers)]
    return main + [f"MTP {k + 1}" for k in range(len(model.moe_gates()) - len(main))]


def evaluate_capabilities(recipe: Recipe, model_dir: Path, tokenizer: Tokenizer, validation_texts: list[str]) -> dict:
    """What the later stages build on: in-context copying (dsv3.eval.induction: loss on the second copy of 16
    random COPY_LENGTH-token sequences vs the first) and, with an MTP module, the share of its drafts the main model accepts
    in greedy speculative decoding on held-out text (report §5.4.3; ACCEPTANCE_PROMPTS windows of the validation
    split, each continued by ACCEPTANCE_NEW_TOKENS tokens) and teacher-forced on ACCEPTANCE_PROMPTS[0] held-out
    windows of half the training length (dsv3.eval.acceptance: a small model's greedy continuations loop)."""
    model = DSV3ForCausalLM.from_pretrained(model_dir)
    half = recipe.data.seq_len // 2  # both measurements stay within the trained length
    copying = copy_losses(model, copy_probe_rows(tokenizer, recipe.seed, length=min(COPY_LENGTH, half)))
    metrics = {"induction_gain": copying["induction_gain"], "second_copy_loss": copying["second_copy_loss"]}
    if model.config.num_nextn_predict_layers:
        count, length = ACCEPTANCE_PROMPTS
        hf_tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompts = acceptance_prompts(hf_tokenizer, validation_texts, count, min(length, half))
        metrics["mtp_acceptance"] = mtp_acceptance(model, prompts, min(ACCEPTANCE_NEW_TOKENS, half))
        windows = acceptance_prompts(hf_tokenizer, validation_texts, count, half)
        metrics["mtp_acceptance_teacher_forced"] = teacher_forced_acceptance(model, windows)
    return metrics


def unigram_cross_entropy(train_rows: datasets.Dataset, val_rows: datasets.Dataset, vocab_size: int) -> float:
    """Nats per token of the validation targets under the training tokens' unigram frequencies (add-one
    smoothed): the loss of a model that ignores context, the baseline the trained model must beat."""
    train_ids = np.asarray(train_rows.with_format("numpy")["input_ids"]).reshape(-1)
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    targets = np.asarray(val_rows.with_format("numpy")["input_ids"])[:, 1:].reshape(-1)
    return float(-log_p[targets].mean())


def stage_result(
    recipe: Recipe,
    workdir: Path,
    result: dict,
    rows: PretrainRows,
    tokenizer: Tokenizer,
    seconds: float,
) -> StageResult:
    cfg = recipe.pretrain
    history = result["history"]
    final_val = [r for r in history if "val/loss" in r][-1]
    last_train = [r for r in history if "train/loss" in r][-1]
    vocab = max(tokenizer.get_vocab_size(with_added_tokens=True), recipe.model.vocab_size or 0)
    unigram = unigram_cross_entropy(rows.corpus_train, validation_subset(rows.validation, cfg.val_max_rows), vocab)
    biases = [json.loads(p.read_text())["router_bias"] for p in sorted((workdir / RANKS).glob("rank*.json"))]
    bias_spread = float(np.max(np.ptp(np.asarray(biases), axis=0))) if len(biases) > 1 else 0.0
    artifacts = [
        plot_losses(history, workdir / "loss_curves.png", baseline=unigram).name,
        plot_max_violation(history, workdir / "maxvio.png").name,
    ]
    if result["val_expert_load"] is not None:
        load = torch.tensor(result["val_expert_load"])
        title = f"Validation expert load ({cfg.balancing}), step {int(final_val['step'])}"
        artifacts.append(plot_expert_load(load, result["gate_labels"], workdir / "expert_load.png", title).name)
    tokens_per_s = [r["train/tokens_per_s"] for r in history if "train/tokens_per_s" in r]
    capabilities = evaluate_capabilities(recipe, workdir / OUTPUT, tokenizer, rows.validation_texts)
    metrics = {
        "final_val_loss": final_val["val/loss"],
        "final_val_bits_per_byte": final_val["val/bits_per_byte"],
        "final_val_maxvio_global": final_val["val/maxvio_global"],
        "best_val_loss": min(r["val/loss"] for r in history if "val/loss" in r),
        "final_train_loss": last_train["train/ce"],
        "final_train_maxvio_batch": last_train.get("train/maxvio_batch", math.nan),
        "unigram_val_loss": unigram,
        "tokens": result["tokens"],
        "steps": result["steps"],
        "tokens_per_s_median": float(np.median(tokens_per_s)) if tokens_per_s else math.nan,
        "train_seconds": seconds,
        "parameters": result["parameters"],
        "resumed_from_step": result["resumed_from_step"],
        "ranks": len(biases),
        "router_bias_rank_spread": bias_spread,
        **capabilities,
        NONFINITE: count_nonfinite(logged_losses(history)),
    }
    summary = (
        f"{result['steps']} steps, {result['tokens'] / 1e6:.2f}M tokens in {seconds:.0f}s "
        f"({metrics['tokens_per_s_median']:.0f} tokens/s); validation loss {metrics['final_val_loss']:.3f} nats/token "
        f"({metrics['final_val_bits_per_byte']:.3f} bits/byte) vs unigram {unigram:.3f}; "
        f"global MaxVio {metrics['final_val_maxvio_global']:.3f} ({cfg.balancing}); induction gain "
        f"{metrics['induction_gain']:.2f} nats"
        + (
            f", MTP draft acceptance {metrics['mtp_acceptance']:.1%} on its greedy continuations, "
            f"{metrics['mtp_acceptance_teacher_forced']:.1%} teacher-forced on held-out text."
            if "mtp_acceptance" in metrics
            else "."
        )
    )
    source = corpus_source(recipe.data)
    data = {"train": StageData(rows.train, source), "validation": StageData(rows.validation, source, "validation")}
    return StageResult(outputs=[OUTPUT], metrics=metrics, artifacts=artifacts, summary=summary, data=data)


STAGE = Stage(
    name="pretrain",
    run=run,
    sections=("data", "model", "pretrain"),
    inputs=("tokenizer",),
    outputs=(OUTPUT,),
    checks={
        "max_val_loss_ratio": ratio("final_val_loss", "unigram_val_loss"),
        "min_induction_gain": metric("induction_gain"),
        "min_mtp_acceptance": metric("mtp_acceptance"),
    },
    headline=(
        "final_val_loss", "unigram_val_loss", "induction_gain", "mtp_acceptance", "mtp_acceptance_teacher_forced",
        "final_val_maxvio_global", "tokens", "tokens_per_s_median",
    ),
    tunable=("pretrain",),  # a diverged run resumes from its last checkpoint after a fix to these
    data_files=data_files,
)  # fmt: skip
