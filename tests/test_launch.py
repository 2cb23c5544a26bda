"""dsv3.train.launch: the torchrun command lines — one node standalone; several nodes meet at MASTER_ADDR:MASTER_PORT,
each with its own rank, and the first node prints the command the others run."""

from pathlib import Path

import pytest

from dsv3.errors import InputError
from dsv3.train.launch import PRETRAIN_ENTRY, torchrun_command

FILES = dict(recipe_file=Path("r.yaml"), workdir=Path("w"), inputs={"tokenizer": Path("t")}, failure_file=Path("f"))


def test_one_node_is_standalone():
    command = torchrun_command(8, 1, PRETRAIN_ENTRY, **FILES)
    assert command[1:6] == ["-m", "torch.distributed.run", "--nproc-per-node=8", "--standalone", "--nnodes=1"]
    assert command[-8:] == ["--recipe", "r.yaml", "--workdir", "w", "--input", "tokenizer=t", "--failure-file", "f"]


def test_several_nodes_meet_at_the_master_each_with_its_rank(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("NODE_RANK", "0")
    here = torchrun_command(8, 4, PRETRAIN_ENTRY, **FILES)
    assert {"--nnodes=4", "--node-rank=0", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29500"} <= set(here)
    other = torchrun_command(8, 4, PRETRAIN_ENTRY, **FILES, node_rank="$NODE_RANK")
    assert [a for a in other if a.startswith("--node-rank")] == ["--node-rank=$NODE_RANK"]


def test_several_nodes_without_a_master_is_one_line_naming_what_is_missing(monkeypatch):
    for key in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(InputError, match="pretrain.num_nodes=2 needs MASTER_ADDR, MASTER_PORT, NODE_RANK"):
        torchrun_command(8, 2, PRETRAIN_ENTRY, **FILES)
