"""dsv3.train.launch: the torchrun command lines — one node standalone; several nodes meet at MASTER_ADDR:MASTER_PORT,
each with its own rank, and the first node prints the command the others run; pretrain.max_restarts: a rank killed
mid-run (2 FSDP ranks over gloo) is restarted by torchrun and resumes from the last sharded checkpoint to the loss
of an uninterrupted run."""

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from dsv3.config import load_recipe
from dsv3.errors import InputError
from dsv3.stages import run_stage
from dsv3.stages.pretrain import RESULT, train_rank
from dsv3.train.checkpoints import LAST
from dsv3.train.launch import launch_torchrun, torchrun_command
from dsv3.train.sharded import is_sharded, sharded_step
from tests.conftest import RECIPES

ENTRY = "dsv3.stages.pretrain:train_rank"
FILES = dict(recipe_file=Path("r.yaml"), workdir=Path("w"), inputs={"tokenizer": Path("t")}, failure_file=Path("f"))


def test_one_node_is_standalone():
    command = torchrun_command(8, 1, ENTRY, **FILES)
    assert command[1:6] == ["-m", "torch.distributed.run", "--nproc-per-node=8", "--standalone", "--nnodes=1"]
    assert command[-8:] == ["--recipe", "r.yaml", "--workdir", "w", "--input", "tokenizer=t", "--failure-file", "f"]


def test_several_nodes_meet_at_the_master_each_with_its_rank(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("NODE_RANK", "0")
    here = torchrun_command(8, 4, ENTRY, **FILES)
    assert {"--nnodes=4", "--node-rank=0", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29500"} <= set(here)
    other = torchrun_command(8, 4, ENTRY, **FILES, node_rank="$NODE_RANK")
    assert [a for a in other if a.startswith("--node-rank")] == ["--node-rank=$NODE_RANK"]


def test_several_nodes_without_a_master_is_one_line_naming_what_is_missing(monkeypatch):
    for key in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(InputError, match="pretrain.num_nodes=2 needs MASTER_ADDR, MASTER_PORT, NODE_RANK"):
        torchrun_command(8, 2, ENTRY, **FILES)


def test_max_restarts_is_passed_to_torchrun():
    assert "--max-restarts=3" in torchrun_command(2, 1, ENTRY, **FILES, max_restarts=3)
    assert not any(a.startswith("--max-restarts") for a in torchrun_command(2, 1, ENTRY, **FILES))


RESTART_TOLERANCE = 1e-5  # 2 FSDP ranks, restarted, vs one process: float reassociation only (as test_strategy.py)


@pytest.mark.slow
def test_a_rank_killed_mid_run_is_restarted_by_torchrun_and_resumes_from_the_last_sharded_checkpoint(tmp_path):
    short = ["name=smoke-restart", "pretrain.steps=8", "pretrain.checkpoint_every_n_steps=2", "pretrain.val_every_n_steps=4",
             "pretrain.accelerator=cpu"]  # fmt: skip
    recipe = load_recipe(RECIPES / "smoke.yaml", short)
    inputs = {"tokenizer": run_stage("tokenizer", recipe, tmp_path / "runs").workdir}

    sharded = load_recipe(RECIPES / "smoke.yaml", [*short, "pretrain.devices=2", "pretrain.strategy=fsdp",
                                                   "pretrain.expert_parallel=2", "pretrain.max_restarts=1"])  # fmt: skip
    folder, failed = tmp_path / "two", []
    folder.mkdir()
    job = threading.Thread(target=lambda: failed.extend(_raised(launch_torchrun, sharded, folder, inputs, 2, 1, train_rank)))
    job.start()
    deadline = time.time() + 60  # the agent starts with this process's environment as it is now, not as training here sets it
    while job.is_alive() and not any("torch.distributed.run" in cmdline(p) for p in psutil.Process().children()) and time.time() < deadline:
        time.sleep(0.05)
    with ThreadPoolExecutor(1) as pool:  # the 2 ranks start, and one is killed, while one process trains here
        killed = pool.submit(kill_a_rank_at_first_sharded_checkpoint, job, folder / "checkpoints" / LAST)
        train_rank(recipe, tmp_path / "one", inputs)
    one = json.loads((tmp_path / "one" / RESULT).read_text())["history"]
    ranks, was_sharded = killed.result()
    assert ranks == 2 and was_sharded
    job.join(timeout=300)
    assert not job.is_alive() and not failed, failed
    result = json.loads((folder / RESULT).read_text())
    assert 0 < result["resumed_from_step"] < 8 and sharded_step(folder / "checkpoints" / LAST) == 8
    two = result["history"]
    for key in ("train/ce", "val/loss"):
        mine, theirs = ([row[key] for row in h if key in row][-1] for h in (two, one))
        assert mine == pytest.approx(theirs, abs=RESTART_TOLERANCE), key


def kill_a_rank_at_first_sharded_checkpoint(job: threading.Thread, last: Path) -> tuple[int, bool]:
    """Once `last` is a sharded checkpoint, SIGKILL the last of the job's ranks (not its torchrun agent); returns
    how many ranks there were and whether `last` was sharded then."""
    deadline = time.time() + 240
    while not is_sharded(last) and job.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    ranks = [p for p in psutil.Process().children(recursive=True)
             if "dsv3.train.launch" in cmdline(p) and "torch.distributed.run" not in cmdline(p)]  # not the agent
    sharded = is_sharded(last)
    if len(ranks) == 2 and sharded:
        os.kill(ranks[-1].pid, signal.SIGKILL)  # one rank dies mid-run; torchrun restarts the job
    return len(ranks), sharded


def cmdline(process: psutil.Process) -> list[str]:
    """Its command line; none for a process gone or a zombie (an earlier test's child not yet reaped)."""
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _raised(function, *args) -> list[BaseException]:
    try:
        function(*args)
    except BaseException as error:  # noqa: BLE001 - reported by the test
        return [error]
    return []
