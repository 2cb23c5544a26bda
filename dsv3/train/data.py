"""The loop's data: packed rows (dsv3.data.build_lm_dataset) in a deterministic, resumable order.

Every optimizer step's rows are fixed in advance by (seed, step plan, step): the rows form an endless stream of
per-epoch permutations and step s takes the next plan.batch_sizes[s] of them, so a run resumed at step s sees
exactly the rows an uninterrupted run would, on any number of ranks.
"""

from __future__ import annotations

import math

import datasets
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dsv3.train.schedules import StepPlan, accumulation_steps
from dsv3.train.settings import LoopSettings


class PackedRows(Dataset):
    """Rows of a packed LM dataset fetched a batch at a time as int64 tensors (B, T)."""

    def __init__(self, rows: datasets.Dataset):
        self.rows = rows.with_format("numpy", columns=["input_ids", "position_ids"])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = self.rows[indices]
        return {key: torch.from_numpy(np.asarray(batch[key], dtype=np.int64)) for key in ("input_ids", "position_ids")}


class ValidationRows(PackedRows):
    """PackedRows whose batches may be padding: a batch of index -1 is row 0 marked `padding` (a forward pass
    that keeps this rank's collectives in step with the others' and counts for nothing)."""

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        padding = indices == [PADDING]
        batch = super().__getitems__([0] if padding else indices)
        return batch | {"padding": torch.tensor(padding)}


PADDING = -1


def validation_batches(n_rows: int, micro_batch_size: int, rank: int, world: int) -> list[list[int]]:
    """Rank `rank`'s validation batches: rows r, r + world, ... in micro-batches, then padding batches ([PADDING])
    up to the batch count of the rank with the most rows. Every rank runs the same number of forward passes — FSDP
    all-gathers and expert-parallel all-to-alls wait for all ranks — and every row is counted exactly once."""
    mine = list(range(rank, n_rows, world))
    batches = [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    most = math.ceil(math.ceil(n_rows / world) / micro_batch_size)
    return batches + [[PADDING]] * (most - len(batches))


def keep_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """collate_fn: PackedRows.__getitems__ already returns the stacked batch (B, T)."""
    return batch


class StepSampler(Sampler[list[int]]):
    """Micro-batches of row indices for optimizer steps start_step.. of `plan`, for one rank.

    The rows form an endless stream of per-epoch permutations (seeded by seed + epoch) — or, `in_order`, of the rows
    as given (a mixture's blend, already in training order); step s takes the next
    plan.batch_sizes[s] rows of the stream, rank r takes its contiguous 1/world share, cut into `accumulation`
    micro-batches. Every index depends only on (seed, plan, step), so a resumed run sees the same data.
    """

    def __init__(
        self, plan: StepPlan, n_rows: int, seed: int, rank: int, world: int, accumulation: int, start_step: int, in_order: bool = False
    ):
        if n_rows == 0:
            raise ValueError("the training set has no rows: use more text or a smaller data.seq_len")
        self.plan, self.n_rows, self.seed, self.in_order = plan, n_rows, seed, in_order
        self.rank, self.world, self.accumulation, self.start_step = rank, world, accumulation, start_step
        self._permutations: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:  # the whole run: Lightning counts batches from the start of the epoch
        return self.plan.steps * self.accumulation

    def _row(self, position: int) -> int:
        epoch, offset = divmod(position, self.n_rows)
        if self.in_order:
            return offset
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


class PackedRowsData(L.LightningDataModule):
    """Training rows through a StepSampler; validation rows split over ranks (rank r takes r::world, padded to the
    same number of batches on every rank: `validation_batches`)."""

    def __init__(
        self,
        train_rows: datasets.Dataset,
        val_rows: datasets.Dataset,
        settings: LoopSettings,
        plan: StepPlan,
        seed: int,
        rows_in_order: bool = False,
    ):
        super().__init__()
        self.train_rows, self.settings, self.plan, self.seed = PackedRows(train_rows), settings, plan, seed
        self.rows_in_order = rows_in_order
        self.val_rows = ValidationRows(validation_subset(val_rows, settings.val_max_rows))

    def train_dataloader(self) -> DataLoader:
        sampler = StepSampler(
            self.plan,
            len(self.train_rows),
            self.seed,
            self.trainer.global_rank,
            self.trainer.world_size,
            accumulation_steps(self.settings),
            start_step=self.trainer.global_step,  # restored from the checkpoint before the loader is built
            in_order=self.rows_in_order,
        )
        return StepDataLoader(self.train_rows, batch_sampler=sampler, collate_fn=keep_batch)

    def val_dataloader(self) -> DataLoader:
        batches = validation_batches(len(self.val_rows), self.settings.micro_batch_size, self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(self.val_rows, batch_sampler=batches, collate_fn=keep_batch)
