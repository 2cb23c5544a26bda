"""Pretraining stage (PAPER.md, "Pretraining", "Balancing", "Multi-token prediction").

FIM-augmented, packed rows of the training split (dsv3.data.build_lm_dataset, cached under runs/<recipe>/cache)
train DSV3ForCausalLM with Lightning: loss = CE + λ·MTP + the sequence-wise balance loss, AdamW, the paper's
schedules in fractions of the run's tokens, and loss-free balancing (or the auxiliary-loss baseline) as a
callback. Validation uses the plain validation split (no FIM, no token splitting) for loss, bits per byte
and the global MaxVio. Metrics go to the stage's MLflow run through Lightning's MLFlowLogger.

Checkpoints: `checkpoints/last.ckpt` every checkpoint_every_n_steps, `checkpoints/best.ckpt` at the lowest
validation loss. A rerun of a killed stage resumes from last.ckpt: weights, optimizer, router biases, the step
(hence the schedules and the data position) and the metric history. devices × num_nodes > 1 trains in a
torchrun subprocess (dsv3.stages.launch).

Output: `model/` — a save_pretrained directory with the tokenizer files next to it, so AutoTokenizer and
AutoModelForCausalLM load it from one folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import datasets
import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.strategies import DDPStrategy
from tokenizers import Tokenizer

from dsv3.config import PretrainSection, Recipe
from dsv3.data.dataset import build_lm_dataset
from dsv3.data.tokenizer import BOS, EOS, PAD, byte_level_table, load_tokenizer, token_bytes
from dsv3.fp8 import FP8BlockwisePrecision
from dsv3.model import DSV3Config
from dsv3.stages import StageResult
from dsv3.stages.balancing import LossFreeBalancer
from dsv3.stages.corpus import recipe_corpus, recipe_data_files
from dsv3.stages.health import NONFINITE, count_nonfinite
from dsv3.stages.launch import inside_torchrun, launch_torchrun, world_size
from dsv3.stages.lightning_module import (
    AtomicCheckpointIO,
    PretrainData,
    PretrainModule,
    StepProgressBar,
    resume_point,
    validation_subset,
)
from dsv3.stages.plots import plot_expert_load, plot_losses, plot_max_violation
from dsv3.stages.schedules import bias_update_speed, step_plan
from dsv3.tracking import stage_run

SECTIONS = ("data", "model", "pretrain")
INPUTS = ("tokenizer",)
OUTPUT = "model"
TUNABLE = ("pretrain",)  # a diverged run resumes from its last checkpoint after a fix to this section
CHECKPOINTS = "checkpoints"
RESULT = "train_result.json"
RANKS = "ranks"


def data_files(recipe: Recipe) -> list[str]:
    """Local corpus files (their content is part of the stage's key)."""
    return recipe_data_files(recipe.data)


def run(recipe: Recipe, workdir: Path, inputs: dict[str, Path]) -> StageResult:
    check_recipe(recipe)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = inputs["tokenizer"] / "tokenizer"
    tokenizer = load_tokenizer(tokenizer_dir)
    train_rows, val_rows = lm_datasets(recipe, tokenizer, workdir)  # built once here, loaded by every rank
    started = time.perf_counter()
    if world_size(recipe.pretrain) > 1 and not inside_torchrun():
        launch_torchrun(recipe, workdir)
    else:
        train(recipe, workdir, tokenizer_dir)
    seconds = time.perf_counter() - started
    result = json.loads((workdir / RESULT).read_text())
    return stage_result(recipe, workdir, result, train_rows, val_rows, tokenizer, seconds)


def check_recipe(recipe: Recipe) -> None:
    if recipe.model is None or recipe.pretrain is None:
        raise ValueError("the pretrain stage needs `model:` and `pretrain:` sections in the recipe")
    if recipe.data.seq_len > recipe.model.max_position_embeddings:
        raise ValueError(
            f"data.seq_len ({recipe.data.seq_len}) exceeds model.max_position_embeddings "
            f"({recipe.model.max_position_embeddings}): lower one or raise the other"
        )


def lm_datasets(recipe: Recipe, tokenizer: Tokenizer, workdir: Path) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Packed training rows (FIM and punctuation splitting at the recipe's rates) and plain validation rows."""
    corpus = recipe_corpus(recipe.data)
    cache = workdir.parent / "cache"
    data = recipe.data
    train_rows = build_lm_dataset(
        corpus["train"], tokenizer, data.seq_len, data.fim_rate, data.split_punctuation_rate, recipe.seed, cache
    )
    val_rows = build_lm_dataset(corpus["validation"], tokenizer, data.seq_len, 0.0, 0.0, recipe.seed, cache)
    if len(val_rows) == 0:
        raise ValueError("the validation split packs into no full row: raise data.validation_fraction or lower data.seq_len")
    return train_rows, val_rows


def model_config(recipe: Recipe, tokenizer: Tokenizer) -> DSV3Config:
    """DSV3Config from the recipe's model section; vocab_size null = the tokenizer's; the aux_loss baseline
    trains with α = pretrain.aux_alpha."""
    fields = recipe.model.model_dump()
    rope_scaling, theta = fields.pop("rope_scaling"), fields.pop("rope_theta")
    rope = {"rope_type": "default", "rope_theta": theta} if rope_scaling is None else rope_scaling | {"rope_theta": theta}
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if fields["vocab_size"] is None:
        fields["vocab_size"] = vocab
    elif fields["vocab_size"] < vocab:
        raise ValueError(f"model.vocab_size ({fields['vocab_size']}) is below the tokenizer's {vocab}: set it to null")
    if recipe.pretrain.balancing == "aux_loss":
        fields["aux_loss_alpha"] = recipe.pretrain.aux_alpha
    return DSV3Config(
        **fields,
        rope_parameters=rope,
        bos_token_id=tokenizer.token_to_id(BOS),
        eos_token_id=tokenizer.token_to_id(EOS),
        pad_token_id=tokenizer.token_to_id(PAD),
    )


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) UTF-8 bytes each token id stands for; 0 for special tokens and unused ids."""
    table = byte_level_table()
    lengths = torch.zeros(vocab_size, dtype=torch.float64)
    for token_id in range(tokenizer.get_vocab_size(with_added_tokens=True)):
        raw = token_bytes(tokenizer, token_id, table)
        lengths[token_id] = 0 if raw is None else len(raw)
    return lengths


def train(recipe: Recipe, workdir: Path, tokenizer_dir: Path) -> None:
    """Fit in this process (one rank of a torchrun job, or the only process), resuming from last.ckpt."""
    cfg = recipe.pretrain
    # We want the post-step state in `last` (Lightning suggests saving the pre-step one for manual optimisation).
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")  # resuming
    tokenizer = load_tokenizer(tokenizer_dir)
    train_rows, val_rows = lm_datasets(recipe, tokenizer, workdir)
    plan = step_plan(cfg, recipe.data.seq_len)
    config = model_config(recipe, tokenizer)
    torch.manual_seed(recipe.seed)
    module = PretrainModule(config, cfg, plan, token_byte_lengths(tokenizer, config.vocab_size))
    data = PretrainData(train_rows, val_rows, cfg, plan, recipe.seed)
    checkpoints = workdir / CHECKPOINTS
    accumulation = module.accumulation
    speed = None if cfg.balancing == "aux_loss" else (lambda tokens: bias_update_speed(tokens, plan.total_tokens, cfg))
    callbacks = [
        LossFreeBalancer(speed),
        ModelCheckpoint(dirpath=checkpoints, save_top_k=0, save_last=True, every_n_train_steps=cfg.checkpoint_every_n_steps),
        ModelCheckpoint(dirpath=checkpoints, filename="best", monitor="val/loss", mode="min", save_top_k=1, auto_insert_metric_name=False),
        StepProgressBar(refresh_rate=accumulation),
    ]
    accelerator = training_accelerator(cfg)
    strategy = (
        DDPStrategy(process_group_backend="gloo" if accelerator == "cpu" else "nccl", broadcast_buffers=False)
        if world_size(cfg) > 1
        else "auto"
    )
    trainer = lightning_trainer(cfg, workdir, plan.steps, accumulation, callbacks, strategy)
    last, resumed_from = resume_point(checkpoints)
    trainer.fit(module, datamodule=data, ckpt_path=last, weights_only=True)
    trainer.validate(module, datamodule=data, verbose=False)
    write_rank_biases(module, workdir / RANKS, trainer.global_rank)
    if trainer.is_global_zero:
        save_model(module, workdir / OUTPUT, tokenizer_dir)
        write_result(workdir / RESULT, module, resumed_from)
    trainer.strategy.barrier("pretrain-written")


def training_accelerator(cfg: PretrainSection) -> str:
    """pretrain.accelerator, with "auto" meaning a GPU when there is one."""
    return cfg.accelerator if cfg.accelerator != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")


def lightning_trainer(
    cfg: PretrainSection, folder: Path, steps: int, accumulation: int, callbacks: list, strategy="auto"
) -> L.Trainer:
    """The Trainer pretraining and every extension phase fit with: `steps` optimizer steps, validation every
    val_every_n_steps, atomic checkpoints, the FP8 plugin when asked for, MLflow logging into the stage's run."""
    accelerator = training_accelerator(cfg)
    tracking = stage_run()
    return L.Trainer(
        accelerator=accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=strategy,
        precision=None if cfg.precision == "fp8-blockwise" else cfg.precision,
        max_steps=steps,
        val_check_interval=cfg.val_every_n_steps * accumulation,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        logger=MLFlowLogger(tracking_uri=tracking[0], run_id=tracking[1]) if tracking else False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO(), *precision_plugins(cfg.precision, cfg.fp8_backend, accelerator)],
        default_root_dir=folder,
        enable_model_summary=False,
        log_every_n_steps=1,  # the module logs itself, every log_every_n_steps optimizer steps
    )


def precision_plugins(precision: str, fp8_backend: str, accelerator: str) -> list[FP8BlockwisePrecision]:
    """The FP8 plugin for `fp8-blockwise` (PAPER.md, "FP8 training"); Lightning's own precisions need none."""
    if precision != "fp8-blockwise":
        return []
    return [FP8BlockwisePrecision(fp8_backend, device="cuda" if accelerator == "gpu" else "cpu")]


def write_rank_biases(module: PretrainModule, folder: Path, rank: int) -> None:
    """Each rank's router biases, so the stage can check they are identical on every rank."""
    folder.mkdir(parents=True, exist_ok=True)
    biases = [gate.e_score_correction_bias.tolist() for gate in module.model.moe_gates()]
    _write_json(folder / f"rank{rank}.json", {"router_bias": biases})


def save_model(module: PretrainModule, out: Path, tokenizer_dir: Path) -> None:
    """save_pretrained (safetensors) plus the tokenizer files, written to a sibling folder and renamed."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    module.model.save_pretrained(partial)
    for item in tokenizer_dir.iterdir():
        if item.is_file() and not (partial / item.name).exists():
            shutil.copy2(item, partial / item.name)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)


def write_result(path: Path, module: PretrainModule, resumed_from: int) -> None:
    gate_names = gate_labels(module)
    _write_json(
        path,
        {
            "history": module.history,
            "val_expert_load": module.val_expert_load.tolist() if module.val_expert_load is not None else None,
            "gate_labels": gate_names,
            "resumed_from_step": resumed_from,
            "steps": module.plan.steps,
            "tokens": module.plan.total_tokens,
            "parameters": sum(p.numel() for p in module.model.parameters()),
        },
    )


def gate_labels(module: PretrainModule) -> list[str]:
    config = module.model.config
    main = [f"layer {i}" for i in range(config.first_k_dense_replace, config.num_hidden_layers)]
    return main + [f"MTP {k + 1}" for k in range(len(module.model.moe_gates()) - len(main))]


def _write_json(path: Path, payload: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload))
    os.replace(partial, path)


def logged_losses(history: list[dict[str, float]]) -> list[float]:
    """Every loss the run logged (training terms, validation, MTP depths): what must stay finite."""
    return [v for row in history for k, v in row.items() if "loss" in k or k in ("train/ce", "train/balance")]


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
    train_rows: datasets.Dataset,
    val_rows: datasets.Dataset,
    tokenizer: Tokenizer,
    seconds: float,
) -> StageResult:
    cfg = recipe.pretrain
    history = result["history"]
    final_val = [r for r in history if "val/loss" in r][-1]
    last_train = [r for r in history if "train/loss" in r][-1]
    vocab = max(tokenizer.get_vocab_size(with_added_tokens=True), recipe.model.vocab_size or 0)
    unigram = unigram_cross_entropy(train_rows, validation_subset(val_rows, cfg.val_max_rows), vocab)
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
        NONFINITE: count_nonfinite(logged_losses(history)),
    }
    summary = (
        f"{result['steps']} steps, {result['tokens'] / 1e6:.2f}M tokens in {seconds:.0f}s "
        f"({metrics['tokens_per_s_median']:.0f} tokens/s); validation loss {metrics['final_val_loss']:.3f} nats/token "
        f"({metrics['final_val_bits_per_byte']:.3f} bits/byte) vs unigram {unigram:.3f}; "
        f"global MaxVio {metrics['final_val_maxvio_global']:.3f} ({cfg.balancing})."
    )
    return StageResult(outputs=[OUTPUT], metrics=metrics, artifacts=artifacts, summary=summary)
