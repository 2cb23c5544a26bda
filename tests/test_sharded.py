"""dsv3.train.sharded: every byte of a sharded checkpoint is read without running pickled code. A pickle planted in
each place a checkpoint is read from — DCP's index (.metadata), a non-tensor entry inside a .distcp file (an optimizer
setting, which torch's default planner unpickles with weights_only=False), Lightning's meta.pt, a one-file
checkpoint — runs nothing: the checkpoint is set aside with one line and the run restarts from the one before."""

import contextlib

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from dsv3.train.checkpoints import LAST, PREVIOUS, resume_point
from dsv3.train.sharded import DCP_INDEX, META, SafeFileSystemReader, SafeLoadPlanner, sharded_step, unsharded
from tests.conftest import _Bomb, pickle_bomb

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # DCP warns that no process group is initialised


def state(lr) -> dict:
    """What ShardedStrategy saves: weights, and an optimizer state whose settings are non-tensor (BYTE_IO) entries."""
    weight = torch.arange(6.0).view(2, 3)
    return {
        "state_dict": {"w": weight},
        "optimizer_0": {
            "state": {"w": {"step": torch.tensor(4.0), "exp_avg": weight / 10}},
            "param_groups": [{"lr": lr, "betas": (0.9, 0.95), "weight_decay": 0.1, "params": ["w"]}],
        },
    }


def write_sharded(path, step: int, lr=1e-3) -> None:
    dcp.save(state(lr), storage_writer=FileSystemWriter(str(path)), no_dist=True)
    torch.save({"global_step": step}, path / META)


def plant(kind: str, path, marker) -> None:
    """A sharded checkpoint at step 4 with a pickle bomb in `kind`."""
    if kind == "setting":  # a valid index pointing param_groups.0.lr at a pickle inside a .distcp file
        write_sharded(path, 4, lr=_Bomb(str(marker)))
        return
    write_sharded(path, 4)
    (path / (DCP_INDEX if kind == "index" else META)).write_bytes(pickle_bomb(marker))


@pytest.mark.parametrize("kind", ["index", "setting", "meta"])
def test_a_pickle_planted_in_a_sharded_checkpoint_runs_nothing_and_the_previous_one_resumes(tmp_path, kind, capsys):
    checkpoints, marker = tmp_path / "checkpoints", tmp_path / "pwned"
    write_sharded(checkpoints / PREVIOUS, 2)
    plant(kind, checkpoints / LAST, marker)
    if kind != "meta":  # the plant is live: torch's own reader and planner run it
        with contextlib.suppress(BaseException):  # a planted index breaks the load after it ran
            _load_state_dict({}, storage_reader=FileSystemReader(str(checkpoints / LAST)), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
        assert marker.exists()
        marker.unlink()

    with pytest.raises(Exception):  # noqa: B017 - every way in refuses it, with an error resume_point catches
        unsharded(checkpoints / LAST)
    with pytest.raises(Exception):  # noqa: B017
        sharded_step(checkpoints / LAST)
    if kind == "setting":
        with pytest.raises(CheckpointException, match="Unsupported global: GLOBAL io.open"):  # the strategy's load, on one process
            dcp.load(state(0.0), storage_reader=SafeFileSystemReader(str(checkpoints / LAST)), planner=SafeLoadPlanner(), no_dist=True)
        with pytest.raises(CheckpointException, match="TypeError: DefaultLoadPlanner .* SafeLoadPlanner"):  # torch's planner is refused before it reads a byte
            dcp.load(state(0.0), storage_reader=SafeFileSystemReader(str(checkpoints / LAST)), planner=DefaultLoadPlanner(), no_dist=True)

    assert resume_point(checkpoints) == (checkpoints / PREVIOUS, 2)
    assert not marker.exists()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dsv3:")]
    assert len(lines) == 1 and "unreadable" in lines[0] and "set aside" in lines[0]
    assert sorted(p.name.split(".corrupt-")[0] for p in checkpoints.iterdir()) == [LAST, PREVIOUS]


def test_a_pickle_planted_in_a_one_file_checkpoint_runs_nothing(tmp_path, capsys):
    checkpoints, marker = tmp_path / "checkpoints", tmp_path / "pwned"
    checkpoints.mkdir()
    torch.save({"global_step": 2}, checkpoints / PREVIOUS)
    (checkpoints / LAST).write_bytes(pickle_bomb(marker))
    assert resume_point(checkpoints) == (checkpoints / PREVIOUS, 2)
    assert not marker.exists()
    assert "set aside" in capsys.readouterr().err


def test_an_untampered_sharded_checkpoint_reads_back_whole(tmp_path):
    write_sharded(tmp_path / LAST, 4)
    assert sharded_step(tmp_path / LAST) == 4
    checkpoint = unsharded(tmp_path / LAST)
    assert checkpoint["global_step"] == 4
    torch.testing.assert_close(checkpoint["state_dict"]["w"], state(0.0)["state_dict"]["w"])
    assert checkpoint["optimizer_states"][0]["param_groups"][0] | {"params": None} == {
        "lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.1, "params": None
    }
