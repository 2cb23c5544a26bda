"""Context-extension stage (docs/paper.md, "Context extension (YaRN)"; DeepSeek-V3 report §4.3).

The pretrained model's RoPE dims switch to YaRN: factor s, original length = the pretraining seq_len, the
β_fast/β_slow ramp and mscale/mscale_all_dim (softmax scale × (0.1·ln s + 1)², as the reference code). It then
trains in the recipe's phases (paper: 4K → 32K → 128K, 1000 steps each at LR 7.3e-6) on packed rows of each
phase's length with the training loop (dsv3.train.fit: AdamW, MTP, balance loss, loss-free bias
updates at extend.bias_update_speed), with a constant LR after an optional warm-up. A share of each phase's rows
(extend.retrieval_fraction) are synthetic passkey documents: training keys hidden in training-split filler.

Evaluation, before and after: passkey accuracy per (length, depth) with held-out keys and validation-split filler
(dsv3.eval.passkey), validation perplexity by context length (dsv3.eval.perplexity: windows of the validation
split, evenly spread, cut into rows of each length; at the pretraining length it estimates exp(pretraining's
validation loss), within the noise it states: `perplexity_rows`), and the induction gain of
repeated random sequences (dsv3.eval.induction) — whether the model can copy from its context at all, which
retrieval needs.

The phases run on the pretraining's processes and strategy (pretrain.devices × num_nodes > 1: a torchrun job, DDP
or FSDP2 with expert parallelism, as dsv3.stages.pretrain). Checkpoints: `phase<i>/checkpoints/last.ckpt` during
phase i; a finished phase writes `phase<i>/model` (the last phase writes `model/`). A rerun after a kill skips
finished phases and resumes the current one from last.ckpt.
Output: `model/` — save_pretrained with the YaRN config, plus the tokenizer files.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from lightning.pytorch.loggers import MLFlowLogger
from tokenizers import Tokenizer

from dsv3.config import ExtendPhase, Recipe
from dsv3.data.corpus import capped_texts, corpus_source, recipe_corpus, recipe_data_files
from dsv3.data.dataset import build_lm_dataset
from dsv3.data.tokenizer import EOS, load_tokenizer, token_byte_lengths
from dsv3.eval.induction import copy_losses, copy_probe_rows
from dsv3.eval.passkey import PasskeyTask, evaluate_passkey, plot_passkey_heatmap
from dsv3.eval.perplexity import plot_perplexity_by_length, window_perplexity
from dsv3.io import write_json_atomic
from dsv3.model import DSV3Config, DSV3ForCausalLM
from dsv3.model.rope import yarn_config
from dsv3.store import Stage, StageData, StageResult, metric
from dsv3.store.health import NONFINITE, count_nonfinite, logged_losses
from dsv3.store.keyed import key_of, reuse_or_compute
from dsv3.store.runs import shared_cache
from dsv3.tracking import stage_run
from dsv3.train import LoopSettings, fit
from dsv3.train.data import validation_subset
from dsv3.train.launch import inside_torchrun, launch_torchrun
from dsv3.train.plots import plot_losses

OUTPUT = "model"
METRICS_NOTE = (  # the report card's line under this stage's metrics (Stage.note)
    "ppl_before_L<n>: perplexity of the validation split in evenly spread windows cut into rows of n tokens "
    "(ppl_rel_se_*: the standard error of its log); at the pretraining length it is exp(pretrain's final_val_loss) "
    "measured on other rows of the same split, equal within their noise; ppl_after_L<n>: the same of the YaRN model."
)
FILLER_BYTES = 2_000_000  # training-split text the passkey documents draw their filler from
RESULT = "result.json"  # phase<i>/result.json: the phase's history, steps and resume point


def data_files(recipe: Recipe) -> list[str]:
    """Local corpus files (their content is part of the stage's key)."""
    return recipe_data_files(recipe.data)


def run(recipe: Recipe, workdir: Path, inputs: dict[str, Path]) -> StageResult:
    check_recipe(recipe)
    workdir.mkdir(parents=True, exist_ok=True)
    source = inputs["pretrain"] / OUTPUT
    tokenizer = load_tokenizer(source)
    corpus = recipe_corpus(recipe.data)
    ext = recipe.extend
    heldout = PasskeyTask(tokenizer, corpus["validation"]["text"], "heldout", ext.passkey_digits, recipe.seed)
    ppl_windows = perplexity_rows(recipe, tokenizer, corpus["validation"], shared_cache(workdir))
    copy_rows = copy_probe_rows(tokenizer, recipe.seed)

    started = time.perf_counter()
    before = cached_evaluation(
        workdir / "eval_before.json", DSV3ForCausalLM.from_pretrained(source), heldout, ppl_windows, copy_rows, recipe
    )
    eval_seconds = time.perf_counter() - started
    started = time.perf_counter()
    settings = LoopSettings.from_pretrain(recipe.pretrain)
    if settings.world_size > 1 and not inside_torchrun():
        for phase in ext.phases:  # built once here, loaded by every rank
            phase_rows(recipe, phase, corpus, tokenizer, shared_cache(workdir))
        launch_torchrun(recipe, workdir, inputs, settings.devices, settings.num_nodes, entry=train_phases)
    else:
        train_phases(recipe, workdir, inputs)
    train_seconds = time.perf_counter() - started
    history: list[dict[str, float]] = []
    resumed_from, offset = {}, 0
    for i in range(1, len(ext.phases) + 1):
        result = json.loads((workdir / f"phase{i}" / RESULT).read_text())
        history += result["history"]
        resumed_from[i] = result["resumed_from_step"]
        offset += result["steps"]

    started = time.perf_counter()
    after = cached_evaluation(
        workdir / "eval_after.json",
        DSV3ForCausalLM.from_pretrained(workdir / OUTPUT),
        heldout,
        ppl_windows,
        copy_rows,
        recipe,
    )
    eval_seconds += time.perf_counter() - started
    result = stage_result(recipe, workdir, before, after, history, resumed_from, offset, train_seconds, eval_seconds)
    source = corpus_source(recipe.data)  # the documents every phase packs at its own length
    result.data = {"corpus": StageData(corpus["train"], source), "validation": StageData(corpus["validation"], source, "validation")}
    return result


def check_recipe(recipe: Recipe) -> None:
    if recipe.extend is None or recipe.pretrain is None:
        raise ValueError("the extend stage needs `pretrain:` and `extend:` sections in the recipe")
    if recipe.extend.phases[0].seq_len <= recipe.data.seq_len:
        raise ValueError(
            f"extend.phases: the first seq_len ({recipe.extend.phases[0].seq_len}) must exceed the pretraining "
            f"data.seq_len ({recipe.data.seq_len})"
        )


def extended_config(config: DSV3Config, recipe: Recipe) -> DSV3Config:
    """The pretrained config with YaRN over the pretraining length, declared for the last phase's length (at least
    s times the pretraining length)."""
    ext = recipe.extend
    return yarn_config(
        config,
        original_length=recipe.data.seq_len,
        max_length=max(ext.phases[-1].seq_len, int(ext.factor * recipe.data.seq_len)),
        factor=ext.factor,
        beta_fast=ext.beta_fast,
        beta_slow=ext.beta_slow,
        mscale=ext.mscale,
        mscale_all_dim=ext.mscale_all_dim,
    )


def phase_output(workdir: Path, index: int, last: bool) -> Path:
    return workdir / OUTPUT if last else workdir / f"phase{index}" / OUTPUT


def phase_rows(
    recipe: Recipe, phase: ExtendPhase, corpus: datasets.DatasetDict, tokenizer: Tokenizer, cache: Path
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Training rows of phase.seq_len: the pretraining mix (FIM, token splitting) plus passkey documents making up
    extend.retrieval_fraction of them; validation rows: the plain validation split."""
    data, ext = recipe.data, recipe.extend
    train_rows = build_lm_dataset(
        corpus["train"],
        tokenizer,
        phase.seq_len,
        data.fim_rate,
        data.split_punctuation_rate,
        recipe.seed,
        cache,
    )
    val_rows = build_lm_dataset(corpus["validation"], tokenizer, phase.seq_len, 0.0, 0.0, recipe.seed, cache)
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise ValueError(
            f"the corpus packs into no full row of {phase.seq_len} tokens: use more text or shorter phases"
        )
    n_retrieval = math.ceil(ext.retrieval_fraction * len(train_rows) / (1 - ext.retrieval_fraction))
    if n_retrieval:
        task = PasskeyTask(
            tokenizer, capped_texts(corpus["train"], FILLER_BYTES), "train", ext.passkey_digits, recipe.seed
        )
        rng = random.Random(f"{recipe.seed}:retrieval:{phase.seq_len}")
        eos = tokenizer.token_to_id(EOS)
        ids = np.asarray([task.document(phase.seq_len, rng, eos) for _ in range(n_retrieval)], dtype=np.int32)
        positions = np.broadcast_to(np.arange(phase.seq_len, dtype=np.int32), ids.shape)
        retrieval = datasets.Dataset.from_dict(
            {"input_ids": ids, "position_ids": positions.copy()}, features=train_rows.features
        )
        train_rows = datasets.concatenate_datasets([train_rows, retrieval])
    return train_rows, val_rows


def train_phases(recipe: Recipe, workdir: Path, inputs: dict[str, Path]) -> None:
    """Train every phase not finished yet, each from the model the one before saved — in this process: the only
    one, or one rank of a torchrun job (the pretraining's processes and strategy)."""
    source = inputs["pretrain"] / OUTPUT
    tokenizer = load_tokenizer(source)
    corpus = recipe_corpus(recipe.data)
    previous, offset = source, 0
    for i, phase in enumerate(recipe.extend.phases, start=1):
        out = phase_output(workdir, i, last=i == len(recipe.extend.phases))
        if not (workdir / f"phase{i}" / RESULT).is_file():  # written after the phase's model: both are there, or
            # the phase trains (resuming from its last checkpoint)
            train_phase(recipe, phase, i, previous, out, workdir / f"phase{i}", corpus, tokenizer, offset)
        previous = out
        offset += LoopSettings.for_extension(recipe.pretrain, recipe.extend, phase).steps


def train_phase(
    recipe: Recipe,
    phase: ExtendPhase,
    index: int,
    source: Path,
    out: Path,
    folder: Path,
    corpus: datasets.DatasetDict,
    tokenizer: Tokenizer,
    step_offset: int,
) -> None:
    """Fit one phase from the model in `source` (resuming from folder/checkpoints/last.ckpt), save it to `out`."""
    train_rows, val_rows = phase_rows(recipe, phase, corpus, tokenizer, shared_cache(folder.parent))
    pretrained = DSV3ForCausalLM.from_pretrained(source)
    config = extended_config(pretrained.config, recipe) if index == 1 else pretrained.config
    tracking = stage_run()
    result = fit(
        LoopSettings.for_extension(recipe.pretrain, recipe.extend, phase),
        config,
        train_rows,
        val_rows,
        folder,
        recipe.seed + index,
        token_byte_lengths(tokenizer, config.vocab_size),
        out,
        source,
        initial_weights=pretrained.state_dict(),
        step_offset=step_offset,
        logger=MLFlowLogger(tracking_uri=tracking[0], run_id=tracking[1]) if tracking else False,
    )
    if result.rank == 0:
        write_json_atomic(
            folder / RESULT,
            {"history": result.history, "resumed_from_step": result.resumed_from_step, "steps": result.steps, "tokens": result.tokens},
        )


def perplexity_rows(
    recipe: Recipe, tokenizer: Tokenizer, validation: datasets.Dataset, cache: Path
) -> torch.Tensor:
    """Windows (N, longest L) of about extend.perplexity_tokens validation tokens, cut into rows of every L when
    scored (dsv3.eval.perplexity.window_perplexity): the same tokens at every length.

    The windows are evenly spread over the packed validation split, as the pretrain stage spreads its validation
    rows, and the split is packed as pretraining packs it (no FIM, no splitting, documents joined by EOS, no BOS):
    rows of the pretraining length cut from a window are rows of pretraining's validation set, and perplexity at
    that length estimates exp(pretraining's validation loss). Its documents differ a lot in difficulty (tiny: the
    sd of a 256-token row's loss is 1.7 nats), so a few windows do not: 2 windows of 2048 scored the tiny model's
    perplexity at 256 at 134 against exp(3.933) = 51 (the stage states the noise: ppl_rel_se_*)."""
    longest = max(recipe.extend.perplexity_lengths)
    packed = build_lm_dataset(validation, tokenizer, longest, 0.0, 0.0, recipe.seed, cache)
    if len(packed) == 0:
        raise ValueError(
            f"extend.perplexity_lengths: the validation split packs into no row of {longest} tokens; drop that length"
        )
    windows = validation_subset(packed, max(1, recipe.extend.perplexity_tokens // longest))
    return torch.tensor(np.asarray(windows.with_format("numpy")["input_ids"]), dtype=torch.long)  # (N, longest)


def passkey_lengths(recipe: Recipe) -> list[int]:
    """extend.passkey_lengths and every length a phase trains at: the evaluation covers what was trained."""
    return sorted(set(recipe.extend.passkey_lengths) | {phase.seq_len for phase in recipe.extend.phases})


def cached_evaluation(
    path: Path,
    model,
    task: PasskeyTask,
    ppl_windows: torch.Tensor,
    copy_rows: torch.Tensor,
    recipe: Recipe,
) -> dict:
    """Passkey accuracy per (length, depth), perplexity per length with the standard error of its log (nats) and
    in-context copying (dsv3.eval.induction) of `model`, kept in `path` across resumes under the key of the
    evaluation's settings (dsv3.store.keyed: a resume after a fix to the extend section measures again what that
    fix changed)."""
    ext = recipe.extend
    settings = ext.model_dump(
        mode="json", include={"passkey_digits", "passkey_depths", "passkey_trials", "perplexity_lengths", "perplexity_tokens", "eval_batch_size"}
    ) | {"measured": path.name, "passkey_lengths": passkey_lengths(recipe)}

    def evaluate() -> dict:
        accuracy = evaluate_passkey(
            model, task, passkey_lengths(recipe), ext.passkey_depths, ext.passkey_trials, ext.eval_batch_size
        )
        scored = {
            length: window_perplexity(model, ppl_windows, length, ext.eval_batch_size)
            for length in sorted(ext.perplexity_lengths)
        }
        return {
            "passkey": [[length, depth, acc] for (length, depth), acc in accuracy.items()],
            "perplexity": {str(k): ppl for k, (ppl, _) in scored.items()},
            "perplexity_se": {str(k): se for k, (_, se) in scored.items()},
            "perplexity_tokens": ppl_windows.numel(),
            "copying": copy_losses(model, copy_rows, ext.eval_batch_size),
        }

    return reuse_or_compute(path, key_of(settings), evaluate)


def stage_result(
    recipe: Recipe,
    workdir: Path,
    before: dict,
    after: dict,
    history: list[dict[str, float]],
    resumed_from: dict[int, int],
    total_steps: int,
    train_seconds: float,
    eval_seconds: float,
) -> StageResult:
    metrics: dict[str, float] = {}
    artifacts = []
    for label, evaluation in (("before", before), ("after", after)):
        accuracy = {(int(length), float(depth)): acc for length, depth, acc in evaluation["passkey"]}
        for length in sorted({length for length, _ in accuracy}):
            cells = [acc for (cell_length, _), acc in accuracy.items() if cell_length == length]
            metrics[f"passkey_accuracy_{label}_L{length}"] = float(np.mean(cells))
        for length, value in evaluation["perplexity"].items():
            metrics[f"ppl_{label}_L{length}"] = value
        for length, value in evaluation.get("perplexity_se", {}).items():
            if math.isfinite(value):  # the sd of log perplexity over the windows / √N (none from one window)
                metrics[f"ppl_rel_se_{label}_L{length}"] = value
        metrics[f"induction_gain_{label}"] = evaluation["copying"]["induction_gain"]
        metrics[f"second_copy_loss_{label}"] = evaluation["copying"]["second_copy_loss"]
        title = f"Passkey retrieval {label} extension (held-out keys and filler)"
        artifacts.append(plot_passkey_heatmap(accuracy, workdir / f"passkey_{label}.png", title).name)
    curves = {
        label: {int(k): v for k, v in e["perplexity"].items()}
        for label, e in (("before", before), ("after", after))
    }
    artifacts.append(
        plot_perplexity_by_length(curves, workdir / "perplexity_by_length.png", recipe.data.seq_len).name
    )
    starts, step = {}, 0
    for i, phase in enumerate(recipe.extend.phases, start=1):
        starts[step] = f"phase {i}: {phase.seq_len} tokens"
        step += LoopSettings.for_extension(recipe.pretrain, recipe.extend, phase).steps
    title = f"Context extension (YaRN s = {recipe.extend.factor:g}): loss by phase"
    artifacts.append(plot_losses(history, workdir / "loss_curves.png", title=title, boundaries=starts).name)
    original = str(recipe.data.seq_len)
    if original in before["perplexity"]:
        metrics["ppl_change_at_original_length"] = (
            after["perplexity"][original] / before["perplexity"][original] - 1
        )
    finals = [r for r in history if "val/loss" in r]
    metrics |= {
        "final_val_loss": finals[-1]["val/loss"] if finals else math.nan,
        "steps": float(total_steps),
        "perplexity_tokens": float(before.get("perplexity_tokens", math.nan)),  # scored at every length
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        NONFINITE: count_nonfinite(logged_losses(history)),
    } | {f"resumed_from_step_phase{i}": float(step) for i, step in resumed_from.items()}
    four_x = f"passkey_accuracy_after_L{4 * recipe.data.seq_len}"
    if four_x in metrics:  # the target length, under a name the health check reads whatever seq_len is
        metrics["passkey_accuracy_after_4x"] = metrics[four_x]
        metrics["passkey_gain_4x"] = metrics[four_x] - metrics[four_x.replace("after", "before")]
    lengths = sorted({int(k) for k in after["perplexity"]})
    judged = [k for k in metrics if k.startswith("passkey_accuracy_after_L")]
    summary = (
        f"YaRN s={recipe.extend.factor}, phases {' → '.join(str(p.seq_len) for p in recipe.extend.phases)} in "
        f"{train_seconds:.0f}s; passkey accuracy before/after: "
        + ", ".join(
            f"L{k.rsplit('_L', 1)[1]} {metrics[k.replace('after', 'before')]:.0%}/{metrics[k]:.0%}"
            for k in judged
        )
        + "; perplexity before/after: "
        + ", ".join(
            f"L{k} {before['perplexity'][str(k)]:.1f}/{after['perplexity'][str(k)]:.1f}" for k in lengths
        )
        + f"; induction gain before/after: {metrics['induction_gain_before']:.2f}/"
        f"{metrics['induction_gain_after']:.2f} nats (0 = no in-context copying)"
    )
    return StageResult(outputs=[OUTPUT], metrics=metrics, artifacts=artifacts, summary=summary)


STAGE = Stage(
    name="extend",
    run=run,
    sections=("data", "pretrain", "extend"),
    inputs=("pretrain",),
    outputs=(OUTPUT,),
    checks={
        "max_ppl_increase": metric("ppl_change_at_original_length"),
        "min_passkey_accuracy_4x": metric("passkey_accuracy_after_4x"),
    },
    headline=(
        "ppl_change_at_original_length", "final_val_loss", "induction_gain_after", "passkey_accuracy_before_", "passkey_accuracy_after_",
        "passkey_gain_4x",
    ),
    tunable=("extend",),  # a diverged run resumes from its last checkpoint after a fix to these
    data_files=data_files,
    note=METRICS_NOTE,
)  # fmt: skip
