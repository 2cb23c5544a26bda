"""The pretraining loop's Lightning pieces: the data module (a deterministic, resumable step sampler over packed
rows) and the LightningModule (PAPER.md, "Pretraining": AdamW β 0.9/0.95, weight decay 0.1 on matrices only,
gradient clip 1.0; loss = CE + λ·mean_k L^k_MTP + the sequence-wise balance loss).

Optimisation is manual so that one optimizer step spans a fixed number of micro-batches whose size follows the
batch-size ramp; every schedule is read from the tokens seen before the step (`StepPlan`), so restoring the step
count restores the schedules and the data position. Metrics go to the Lightning logger (MLflow in the stage)
with the optimizer step as their step, and into `history`, which checkpoints carry across a resume.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import TQDMProgressBar
from torch.utils.data import DataLoader, Dataset, Sampler

from dsv3.config import PretrainSection
from dsv3.eval.expert_load import max_violation
from dsv3.fp8 import AdamWBF16Moments
from dsv3.model import DSV3Config, DSV3ForCausalLM
from dsv3.stages.schedules import StepPlan, accumulation_steps, learning_rate, mtp_weight


class PackedRows(Dataset):
    """Rows of a packed LM dataset (dsv3.data.build_lm_dataset) fetched a batch at a time as int64 tensors."""

    def __init__(self, rows: datasets.Dataset):
        self.rows = rows.with_format("numpy", columns=["input_ids", "position_ids"])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = self.rows[indices]
        return {key: torch.from_numpy(np.asarray(batch[key], dtype=np.int64)) for key in ("input_ids", "position_ids")}


def keep_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """collate_fn: PackedRows.__getitems__ already returns the stacked batch (B, T)."""
    return batch


class StepSampler(Sampler[list[int]]):
    """Micro-batches of row indices for optimizer steps start_step.. of `plan`, for one rank.

    The rows form an endless stream of per-epoch permutations (seeded by seed + epoch); step s takes the next
    plan.batch_sizes[s] rows of the stream, rank r takes its contiguous 1/world share, cut into `accumulation`
    micro-batches. Every index depends only on (seed, plan, step), so a resumed run sees the same data.
    """

    def __init__(self, plan: StepPlan, n_rows: int, seed: int, rank: int, world: int, accumulation: int, start_step: int):
        if n_rows == 0:
            raise ValueError("the training set has no rows: use more text or a smaller data.seq_len")
        self.plan, self.n_rows, self.seed = plan, n_rows, seed
        self.rank, self.world, self.accumulation, self.start_step = rank, world, accumulation, start_step
        self._permutations: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:  # the whole run: Lightning counts batches from the start of the epoch
        return self.plan.steps * self.accumulation

    def _row(self, position: int) -> int:
        epoch, offset = divmod(position, self.n_rows)
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._permutations = {epoch: torch.randperm(self.n_rows, generator=generator)}
        return int(self._permutations[epoch][offset])

    def step_indices(self, step: int) -> list[list[int]]:
        """This rank's micro-batches of optimizer step `step`."""
        per_rank = self.plan.batch_sizes[step] // self.world
        micro = per_rank // self.accumulation
        first = self.plan.rows_before(step) + self.rank * per_rank
        rows = [self._row(first + i) for i in range(per_rank)]
        return [rows[m * micro : (m + 1) * micro] for m in range(self.accumulation)]

    def __iter__(self):
        for step in range(self.start_step, self.plan.steps):
            yield from self.step_indices(step)


def validation_subset(val_rows: datasets.Dataset, max_rows: int | None) -> datasets.Dataset:
    """At most max_rows rows spread evenly over the validation set (its documents differ a lot in difficulty)."""
    if max_rows is None or max_rows >= len(val_rows):
        return val_rows
    return val_rows.select(np.linspace(0, len(val_rows) - 1, max_rows).round().astype(int).tolist())


class StepDataLoader(DataLoader):
    """A DataLoader over a StepSampler. Its position is the restored optimizer step (read when Lightning builds
    the loader after restoring a checkpoint), so its own state is only that step, kept for the record."""

    def state_dict(self) -> dict[str, int]:
        return {"start_step": self.batch_sampler.start_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Nothing to load: the sampler already starts at the restored step."""


class PretrainData(L.LightningDataModule):
    """Packed training rows through a StepSampler; validation rows split over ranks (rank r takes r::world)."""

    def __init__(self, train_rows: datasets.Dataset, val_rows: datasets.Dataset, cfg: PretrainSection, plan: StepPlan, seed: int):
        super().__init__()
        self.train_rows, self.cfg, self.plan, self.seed = PackedRows(train_rows), cfg, plan, seed
        self.val_rows = PackedRows(validation_subset(val_rows, cfg.val_max_rows))

    def train_dataloader(self) -> DataLoader:
        sampler = StepSampler(
            self.plan,
            len(self.train_rows),
            self.seed,
            self.trainer.global_rank,
            self.trainer.world_size,
            accumulation_steps(self.cfg),
            start_step=self.trainer.global_step,  # restored from the checkpoint before the loader is built
        )
        return StepDataLoader(self.train_rows, batch_sampler=sampler, collate_fn=keep_batch)

    def val_dataloader(self) -> DataLoader:
        mine = list(range(self.trainer.global_rank, len(self.val_rows), self.trainer.world_size))
        batches = [mine[i : i + self.cfg.micro_batch_size] for i in range(0, len(mine), self.cfg.micro_batch_size)]
        return DataLoader(self.val_rows, batch_sampler=batches, collate_fn=keep_batch)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices (linear, embedding, stacked experts), none on norms and biases (1-D)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


class PretrainModule(L.LightningModule):
    """DSV3ForCausalLM trained on L = CE + λ·(1/D) Σ_k L^k_MTP + L_Bal (PAPER.md, "Multi-token prediction",
    "Balancing"), one optimizer step per `accumulation_steps` micro-batches.

    token_bytes (V,): UTF-8 bytes each token id stands for (0 for special tokens), for bits per byte.
    """

    def __init__(self, config: DSV3Config, cfg: PretrainSection, plan: StepPlan, token_bytes: torch.Tensor):
        super().__init__()
        self.model = DSV3ForCausalLM(config)
        self.cfg, self.plan = cfg, plan
        self.accumulation = accumulation_steps(cfg)
        self.n_main_moe_layers = max(config.num_hidden_layers - config.first_k_dense_replace, 0)
        self.register_buffer("token_bytes", token_bytes.to(torch.int64), persistent=False)  # ints: no precision cast
        self.automatic_optimization = False
        self.history: list[dict[str, float]] = []
        self.val_expert_load: torch.Tensor | None = None
        self._micro = 0
        self._sums: dict[str, torch.Tensor] = {}
        self._pending: dict[str, float] | None = None
        self._clock: tuple[float, int] | None = None

    # ------------------------------------------------------------------------------------------- training

    def configure_optimizers(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        adamw = AdamWBF16Moments if cfg.optimizer_states_bf16 else torch.optim.AdamW
        return adamw(
            parameter_groups(self.model, cfg.weight_decay),
            lr=cfg.lr_peak,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
        )

    def tokens_seen_before(self, step: int) -> int:
        return self.plan.tokens_before(step)

    def forward_losses(self, batch: dict[str, torch.Tensor]):
        """The model on one micro-batch (B, T); position_ids only with document masking (the paper packs without)."""
        ids = batch["input_ids"]
        position_ids = batch["position_ids"] if self.cfg.document_masking else None
        return self.model(input_ids=ids, labels=ids, position_ids=position_ids, use_cache=False)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        step = self.global_step
        tokens = self.plan.tokens_before(step)
        total = self.plan.total_tokens
        optimizer = self.optimizers()
        if self._micro == 0:
            lr = learning_rate(tokens, total, self.cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            self._sums = {}
            if self._clock is None:
                self._clock = (time.perf_counter(), tokens)
        lam = mtp_weight(tokens, total, self.cfg)
        out = self.forward_losses(batch)
        mtp = out.mtp_losses.mean() if out.mtp_losses is not None else out.loss.new_zeros(())
        loss = out.loss + lam * mtp + out.balance_loss
        self.manual_backward(loss / self.accumulation)
        self._add(
            loss=loss.detach(),
            ce=out.loss.detach(),
            balance=out.balance_loss.detach(),
            mtp=out.mtp_losses.detach() if out.mtp_losses is not None else out.loss.new_zeros(0),
            load=torch.stack([gate.expert_load for gate in self.model.moe_gates()]),
        )
        self._micro += 1
        if self._micro < self.accumulation:
            return {"loss": loss.detach()}

        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._micro = 0
        self.log("loss", self._sums["ce"] / self.accumulation, prog_bar=True, logger=False)
        self._pending = self._step_metrics(step, lam, optimizer.param_groups[0]["lr"], grad_norm)
        return {"loss": loss.detach(), "step_expert_load": self._sums["load"]}

    def _add(self, **values: torch.Tensor) -> None:
        for key, value in values.items():
            self._sums[key] = self._sums[key] + value if key in self._sums else value.clone()

    def _step_metrics(self, step: int, lam: float, lr: float, grad_norm: torch.Tensor) -> dict[str, float] | None:
        """Metrics of the step just taken when it is a logging step (means over micro-batches and ranks)."""
        done = step + 1
        tokens_after = self.plan.tokens_before(done)
        now = time.perf_counter()
        started, tokens_then = self._clock
        rate = (tokens_after - tokens_then) / max(now - started, 1e-9)
        self.log("tok_s", rate, prog_bar=True, logger=False)
        if done % self.cfg.log_every_n_steps and done != self.plan.steps:
            return None
        self._clock = (now, tokens_after)
        names = ["loss", "ce", "balance"]
        mtp = self._sums["mtp"]
        values = torch.stack([self._sums[n] for n in names] + list(mtp)) / self.accumulation
        values = self.trainer.strategy.reduce(values, reduce_op="mean")
        metrics = {f"train/{n}": float(v) for n, v in zip(names, values[:3], strict=True)}
        metrics |= {f"train/mtp_loss_depth{k + 1}": float(v) for k, v in enumerate(values[3:])}
        metrics |= {
            "train/lr": lr,
            "train/mtp_lambda": lam,
            "train/grad_norm": float(grad_norm),
            "train/tokens_seen": float(tokens_after),
            "train/batch_size": float(self.plan.batch_sizes[step]),
            "train/tokens_per_s": rate,
        }
        return metrics

    def note_step_load(self, batch_max_violation: float) -> None:
        """Called by the balancer after each optimizer step with the step's batch MaxVio; logs a logging step."""
        if self._pending is not None:
            self.record(self._pending | {"train/maxvio_batch": batch_max_violation}, self.global_step)
            self._pending = None

    def record(self, metrics: dict[str, float], step: int) -> None:
        self.history.append({"step": float(step), **metrics})
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=step)

    # ----------------------------------------------------------------------------------------- validation

    def on_validation_epoch_start(self) -> None:
        self._val: dict[str, torch.Tensor] = {}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ids = batch["input_ids"]
        out = self.forward_losses(batch)
        B, T = ids.shape
        n_targets = B * (T - 1)
        sums = {
            "nats": out.loss.double() * n_targets,
            "targets": torch.tensor(float(n_targets), dtype=torch.float64, device=ids.device),
            "bytes": self.token_bytes[ids[:, 1:]].sum().double(),
            "rows": torch.tensor(float(B), dtype=torch.float64, device=ids.device),
            "mtp": (out.mtp_losses.double() * B) if out.mtp_losses is not None else ids.new_zeros(0, dtype=torch.float64),
        }
        sums["load"] = torch.stack([gate.expert_load for gate in self.model.moe_gates()]).double()  # (G, E)
        for key, value in sums.items():
            self._val[key] = self._val[key] + value if key in self._val else value

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        flat = torch.cat([self._val[k].reshape(-1) for k in ("nats", "targets", "bytes", "rows", "mtp", "load")])
        flat = self.trainer.strategy.reduce(flat, reduce_op="sum")
        nats, targets, n_bytes, rows = (float(x) for x in flat[:4])
        depth = self._val["mtp"].numel()
        mtp = flat[4 : 4 + depth] / rows
        load = flat[4 + depth :].view_as(self._val["load"])
        loss = nats / targets
        self.val_expert_load = load.float().cpu()
        metrics = {
            "val/loss": loss,
            "val/perplexity": math.exp(min(loss, 50.0)),
            "val/bits_per_byte": nats / (n_bytes * math.log(2)),
            "val/maxvio_global": max_violation(load[: self.n_main_moe_layers]),
            "val/tokens": targets,
        } | {f"val/mtp_loss_depth{k + 1}": float(v) for k, v in enumerate(mtp)}
        self.log("val/loss", loss, logger=False)
        self.record(metrics, self.global_step)

    # ---------------------------------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dsv3_history"] = self.history

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = list(checkpoint.get("dsv3_history", []))


class StepProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar (ETA, and the module's `loss` and `tok_s`) over the run's micro-batches: the default
    caps its total at max_steps, which here counts optimizer steps, not batches."""

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.num_training_batches


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed: a kill never leaves a truncated last.ckpt. The last.ckpt
    being replaced becomes previous.ckpt, the fallback when last.ckpt turns out unreadable (`resume_point`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        partial = Path(f"{path}.partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        if path.name == LAST and path.is_file():
            os.replace(path, path.with_name(PREVIOUS))
        os.replace(partial, path)


LAST, PREVIOUS = "last.ckpt", "previous.ckpt"


def resume_point(checkpoints: Path) -> tuple[Path | None, int]:
    """(the newest readable checkpoint of last.ckpt / previous.ckpt, its optimizer step), or (None, 0) when a run
    left none. An unreadable one (truncated, tampered: it is loaded with weights_only=True) is set aside as
    `<name>.corrupt-<time>`, never deleted, and the run says so."""
    for name in (LAST, PREVIOUS):
        path = Path(checkpoints) / name
        if not path.is_file():
            continue
        try:
            step = int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is set aside the same way
            aside = path.with_name(f"{name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(path, aside)
            reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
            print(f"dsv3: checkpoint {path} is unreadable ({reason}); set aside as {aside.name}", file=sys.stderr)
            continue
        return path, step
    return None, 0
