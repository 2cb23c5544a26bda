"""dsv3/train/data.py: validation rows split over ranks never hang. Every rank runs the same number of validation
batches (padding batches count for nothing), every row is counted once, and 3 processes (FSDP2 + expert
parallelism over gloo, forked) validating 7 rows — 3, 2 and 2 per rank — finish with one process's validation loss."""

import json
import os
import socket
import time
from pathlib import Path

import datasets
import pytest
import torch
import torch.multiprocessing as mp

from dsv3.config import PretrainSection
from dsv3.train import LoopSettings, fit
from dsv3.train.data import PADDING, validation_batches
from tests.toy_model import toy_config

WORLD, SEQ, VAL_ROWS = 3, 16, 7  # 7 rows over 3 ranks: 3, 2, 2
TOLERANCE = 1e-5  # 3 ranks vs one process after 2 optimizer steps: measured 0.0 (equal to the last bit)
CONFIG = dict(vocab_size=64, n_routed_experts=6, num_nextn_predict_layers=1, max_position_embeddings=SEQ)


@pytest.mark.parametrize("n_rows, micro, world", [(9, 4, 2), (7, 1, 3), (2, 2, 3), (16, 4, 2), (5, 3, 4)])
def test_every_rank_runs_as_many_validation_batches_and_every_row_counts_once(n_rows, micro, world):
    batches = [validation_batches(n_rows, micro, rank, world) for rank in range(world)]
    assert len({len(b) for b in batches}) == 1  # the same number of forward passes everywhere
    rows = [row for mine in batches for batch in mine if batch != [PADDING] for row in batch]
    assert sorted(rows) == list(range(n_rows))
    assert all(0 < len(batch) <= micro for mine in batches for batch in mine)


def rows(n: int, seed: int) -> datasets.Dataset:
    ids = torch.randint(3, 64, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    features = datasets.Features(
        input_ids=datasets.List(datasets.Value("int32"), length=SEQ),
        position_ids=datasets.List(datasets.Value("int32"), length=SEQ),
    )
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "position_ids": [list(range(SEQ))] * n}, features=features)


def val_loss(folder: Path, devices: int) -> float:
    """Train 2 steps and validate; rank 0 writes and returns the final validation loss."""
    section = dict(steps=2, global_batch_size=3, micro_batch_size=1, lr_peak=1e-2, val_every_n_steps=1, accelerator="cpu",
                   checkpoint_every_n_steps=100, log_every_n_steps=1)  # fmt: skip
    if devices > 1:
        section |= dict(devices=devices, strategy="fsdp", expert_parallel=devices)
    settings = LoopSettings.from_pretrain(PretrainSection(**section))
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    result = fit(settings, toy_config(**CONFIG), rows(30, 0), rows(VAL_ROWS, 1), folder, 0, torch.ones(64), folder / "model", folder / "tokenizer")
    loss = [row["val/loss"] for row in result.history if "val/loss" in row][-1]
    if result.rank == 0:
        (folder / "val_loss.json").write_text(json.dumps(loss))
    return loss


def _rank(rank: int, folder: str, port: int) -> None:
    """One rank as torchrun would start it (Lightning reads the torchelastic environment)."""
    torch.set_num_threads(1)
    os.environ |= dict(RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_RUN_ID="test")  # fmt: skip
    val_loss(Path(folder), WORLD)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_three_ranks_validate_an_odd_row_count_to_one_process_loss(tmp_path):
    started = time.time()
    # forked, not spawned (no second import of torch and Lightning); a hang fails the test instead of blocking it
    context = mp.start_processes(_rank, args=(str(tmp_path / "three"), free_port()), nprocs=WORLD, join=False, start_method="fork")
    while not context.join(timeout=1):
        if time.time() - started > 120:
            for process in context.processes:
                process.kill()
            pytest.fail("3 ranks validating 7 rows did not finish in 120 s (a rank waits for a collective)")
    three = json.loads((tmp_path / "three" / "val_loss.json").read_text())
    one = val_loss(tmp_path / "one", 1)
    assert three == pytest.approx(one, abs=TOLERANCE), f"3 ranks {three} vs one process {one}: {abs(three - one):.2e}"
