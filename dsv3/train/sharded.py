"""The sharded checkpoint format of FSDP2 runs: a torch.distributed.checkpoint (DCP) folder in which every rank wrote
its shards, plus `meta.pt` (Lightning's name for the checkpoint's non-tensor part: step, loops, callbacks, history).
DCP reshards on load, so a folder written by 2 ranks resumes on 1 and the other way round.

Reading runs no pickled code: `meta.pt` is loaded with weights_only=True and DCP's index (`.metadata`, a pickle) with
an unpickler that resolves only DCP's own metadata classes (`SafeFileSystemReader`).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import (
    _EmptyStateDictLoadPlanner,  # as DCP's format_utils reads one
)
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

META = "meta.pt"
DCP_INDEX = ".metadata"


class MetadataUnpickler(pickle.Unpickler):
    """Resolves only what a DCP index holds: DCP's metadata and storage classes, torch.Size, dtypes and layouts (by
    name), the checkpoint's path and plain containers. Anything else — a planted callable — is refused
    (pickle.UnpicklingError)."""

    ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    ALLOWED = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # looks a name up among torch's layouts, nothing else
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }

    def find_class(self, module: str, name: str):
        if module in self.ALLOWED_MODULES or (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"a checkpoint index may not name {module}.{name}")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the index read by MetadataUnpickler (the tensors are read as DCP reads them)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with open(Path(self.path) / DCP_INDEX, "rb") as fh:
            metadata = MetadataUnpickler(fh).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{self.path}/{DCP_INDEX} is not a checkpoint index")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def is_sharded(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / DCP_INDEX).is_file()


def read_meta(path: Path) -> dict[str, Any]:
    return torch.load(Path(path) / META, map_location="cpu", weights_only=True)


def sharded_step(path: Path) -> int:
    """The optimizer step of a sharded checkpoint, after checking that its index and metadata read back safely."""
    SafeFileSystemReader(str(path)).read_metadata()
    return int(read_meta(path)["global_step"])


def unsharded(path: Path) -> dict[str, Any]:
    """A sharded checkpoint as the one-file checkpoint a one-process run writes (read without any process group):
    every tensor whole, the optimizer state keyed by parameter index in its groups' order (FSDP2 keys it by name)."""
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=SafeFileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    checkpoint = read_meta(path)
    checkpoint["state_dict"] = state["state_dict"]
    checkpoint["optimizer_states"] = [by_index(state[k]) for k in sorted(k for k in state if k.startswith("optimizer_"))]
    return checkpoint


def by_index(optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter name -> keyed by index, numbered through the groups in order."""
    index = {name: i for i, name in enumerate(n for group in optimizer_state["param_groups"] for n in group["params"])}
    return {
        "state": {index[name]: value for name, value in optimizer_state["state"].items()},
        "param_groups": [group | {"params": [index[n] for n in group["params"]]} for group in optimizer_state["param_groups"]],
    }


def by_name(optimizer_state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """`by_index` inverted: a one-file optimizer state dict (keyed by index through the groups) keyed by `names`, the
    names of the optimizer's parameters in its groups' order."""
    return {
        "state": {names[i]: value for i, value in optimizer_state["state"].items()},
        "param_groups": [group | {"params": [names[i] for i in group["params"]]} for group in optimizer_state["param_groups"]],
    }
