"""The strategy of FSDP2 runs: Lightning's ModelParallelStrategy (it calls `configure_model`, where the module applies
dsv3.train.parallel) with the loop's checkpoint rules (dsv3.train.checkpoints) for sharded folders: every rank writes
its shards to `<name>.partial/`, rank 0 adds meta.pt and puts the folder in place (last.ckpt's predecessor becomes
previous.ckpt), and loading reads every byte of it without running pickled code (dsv3.train.sharded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dsv3.train.checkpoints import put_in_place, remove
from dsv3.train.sharded import META, SafeFileSystemReader, SafeLoadPlanner, by_name, is_sharded, read_meta


class ShardedStrategy(ModelParallelStrategy):
    """FSDP2 over all `world` ranks (no tensor parallelism), with atomic, safely read DCP checkpoints; a one-file
    checkpoint (a one-process run's) is sharded onto this run's ranks."""

    def __init__(self, world: int, process_group_backend: str):
        super().__init__(data_parallel_size=world, tensor_parallel_size=1, process_group_backend=process_group_backend)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(path.name + ".partial")
        if self.global_rank == 0:
            remove(partial)
            partial.mkdir(parents=True)
        self.barrier("checkpoint-partial")
        tensors = {"state_dict": checkpoint.pop("state_dict")}
        tensors |= {f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))}
        dcp.save(tensors, storage_writer=FileSystemWriter(str(partial)))
        if self.global_rank == 0:
            torch.save(checkpoint, partial / META)
            put_in_place(partial, path)
        self.barrier("checkpoint-written")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Weights and optimizer state into this run's shards; returns the rest (step, loops, callbacks, history)."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if not is_sharded(path):
            return self.load_one_file(path)
        model_state = {"state_dict": get_model_state_dict(self.model)}
        dcp.load(model_state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner())
        set_model_state_dict(self.model, model_state["state_dict"], options=StateDictOptions(strict=self.lightning_module.strict_loading))
        for i, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{i}"
            optim_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(optim_state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner())
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optim_state[key], options=StateDictOptions())
        return read_meta(path)

    def load_one_file(self, path: Path) -> dict[str, Any]:
        """A one-process run's checkpoint: every rank reads the file and keeps its shards. Its optimizer state is
        keyed by index in the optimizer's group order (not the module's parameter order Lightning assumes)."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        full = StateDictOptions(full_state_dict=True, strict=self.lightning_module.strict_loading)
        set_model_state_dict(self.model, checkpoint.pop("state_dict"), options=full)
        name_of = {id(p): name for name, p in self.model.named_parameters()}
        for optimizer, state in zip(self.optimizers, checkpoint.pop("optimizer_states"), strict=True):
            names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=by_name(state, names), options=full)
        return checkpoint
