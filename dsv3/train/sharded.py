"""The sharded checkpoint format of FSDP2 runs: a torch.distributed.checkpoint (DCP) folder in which every rank wrote
its shards, plus `meta.pt` (Lightning's name for the checkpoint's non-tensor part: step, loops, callbacks, history).
DCP reshards on load, so a folder written by 2 ranks resumes on 1 and the other way round.

Reading runs no pickled code. Every byte of a checkpoint goes through weights_only=True or an allow-listed unpickler:
`meta.pt` is loaded with weights_only=True, DCP's index (`.metadata`, a pickle) with an unpickler that resolves only
DCP's own metadata classes, the tensors as DCP reads them (weights_only=True), and the non-tensor entries inside the
`.distcp` files (optimizer settings such as `param_groups.0.lr`, which torch's default planner unpickles with
weights_only=False) by `SafeBytes` planners with weights_only=True. `SafeFileSystemReader` refuses any other planner.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    _EmptyStateDictLoadPlanner,  # as DCP's format_utils reads one
)
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.futures import Future

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


class SafeBytes:
    """A DefaultLoadPlanner mixin: the checkpoint's non-tensor entries (DCP's BYTE_IO items: optimizer settings) are
    read with torch.load(weights_only=True), where torch's planner uses weights_only=False; a planted callable raises
    pickle.UnpicklingError instead of running."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        loaded = torch.load(value, map_location="cpu", weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


class SafeLoadPlanner(SafeBytes, DefaultLoadPlanner):
    """dcp.load's default planner (into an existing state dict), non-tensor entries read safely."""


class SafeWholeLoadPlanner(SafeBytes, _EmptyStateDictLoadPlanner):
    """The whole checkpoint into an empty dict (one process, no process group), non-tensor entries read safely."""


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the index read by MetadataUnpickler, the tensors as DCP reads them (weights_only=True)
    and the non-tensor entries by a SafeBytes planner: any other planner is refused (TypeError)."""

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if not isinstance(planner, SafeBytes):
            raise TypeError(f"{type(planner).__name__} unpickles checkpoint bytes with code: load with SafeLoadPlanner")
        return super().read_data(plan, planner)

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
    """The optimizer step of a sharded checkpoint, after checking that its index, its non-tensor entries and its
    metadata read back safely (a tampered one raises here, so resume_point sets it aside before any rank loads it)."""
    reader = SafeFileSystemReader(str(path))
    metadata = reader.read_metadata()
    settings = {key for key, entry in metadata.state_dict_metadata.items() if isinstance(entry, BytesStorageMetadata)}
    if settings:
        read_whole({}, reader, SafeWholeLoadPlanner(keys=settings))
    return int(read_meta(path)["global_step"])


def read_whole(state: dict[str, Any], reader: SafeFileSystemReader, planner: SafeWholeLoadPlanner) -> None:
    """DCP's one-process load into `state`; its failure (a CheckpointException, which is no Exception) raised as the
    pickle.UnpicklingError, OSError, ... it wraps, so callers that set unreadable checkpoints aside catch it."""
    try:
        _load_state_dict(state, storage_reader=reader, planner=planner, no_dist=True)
    except CheckpointException as error:
        cause = next(iter(error.failures.values()), (None, None))[0]  # (exception, trace) per rank
        if isinstance(cause, Exception):
            raise cause from None
        raise pickle.UnpicklingError(f"{reader.path}: unreadable ({error})") from None


def unsharded(path: Path) -> dict[str, Any]:
    """A sharded checkpoint as the one-file checkpoint a one-process run writes (read without any process group):
    every tensor whole, the optimizer state keyed by parameter index in its groups' order (FSDP2 keys it by name)."""
    state: dict[str, Any] = {}
    read_whole(state, SafeFileSystemReader(str(path)), SafeWholeLoadPlanner())
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
