"""Multi-process training as a `torchrun` subprocess (docs/design.md, "Known traps": Lightning's DDP re-executes the
script, so it never runs inside the Prefect task).

A stage calls `launch_torchrun` when devices × num_nodes > 1; every rank then runs
`python -m dsv3.train.launch --entry MODULE:FUNCTION --recipe R --workdir W --input NAME=DIR ...`, which calls
FUNCTION(recipe, workdir, inputs) (the pretrain stage's `train_rank`, the extend stage's `train_phases`) and exits.
A rank that fails for a known reason (a diverged loss, bad input, a full disk, Ctrl-C) writes it to the failure
file and exits 1 without a traceback; the stage raises it again. A rank dies with its torchrun agent.
With pretrain.max_restarts = N, torchrun restarts the whole job up to N times when a rank dies (a lost process, a
killed node): every rank then resumes from the last checkpoint, without a human.
On a cluster, `make pretrain` on the first node prints the torchrun command every other node runs (the same
recipe file, stage folder and inputs on a shared runs folder; MASTER_ADDR, MASTER_PORT and NODE_RANK set).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist
import yaml

from dsv3.config import Recipe, load_recipe
from dsv3.errors import Failure, InputError, StageFailed, TrainingDiverged, classify
from dsv3.io import write_json_atomic

RECIPE_FILE = "recipe.yaml"
FAILURE_FILE = "rank-failure.json"


def inside_torchrun() -> bool:
    """True in a process that torchrun (or another launcher setting LOCAL_RANK) started."""
    return "LOCAL_RANK" in os.environ


def join_attempt_process_group(backend: str) -> None:
    """Under torchrun with several ranks, the default process group in a store namespace of its own per restart
    attempt (TORCHELASTIC_RESTART_COUNT): torchrun's store outlives a restart, and a restarted job that read the
    dead attempt's addresses would never connect. Lightning then finds the group initialised and uses it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not inside_torchrun() or world < 2 or dist.is_initialized():
        return
    store, rank, world = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"dsv3/attempt-{attempt}", store), rank=rank, world_size=world)


def torchrun_command(
    devices: int,
    num_nodes: int,
    entry: str,
    recipe_file: Path,
    workdir: Path,
    inputs: dict[str, Path],
    failure_file: Path,
    node_rank: str | None = None,
    max_restarts: int = 0,
) -> list[str]:
    """The torchrun command line for a node (this one: node_rank None, read from NODE_RANK): standalone on one node,
    c10d rendezvous at MASTER_ADDR:MASTER_PORT across several; the job restarted up to max_restarts times."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={devices}"]
    if max_restarts:
        command.append(f"--max-restarts={max_restarts}")
    if num_nodes == 1:
        command += ["--standalone", "--nnodes=1"]
    else:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK") if k not in os.environ]
        if missing:
            raise InputError(f"pretrain.num_nodes={num_nodes} needs {', '.join(missing)} in the environment on every node")
        command += [
            f"--nnodes={num_nodes}",
            f"--node-rank={node_rank if node_rank is not None else os.environ['NODE_RANK']}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        ]
    command += ["-m", "dsv3.train.launch", "--entry", entry, "--recipe", str(recipe_file), "--workdir", str(workdir)]
    for name, folder in inputs.items():
        command += ["--input", f"{name}={folder}"]
    return command + ["--failure-file", str(failure_file)]


def launch_torchrun(
    recipe: Recipe, workdir: Path, inputs: dict[str, Path], devices: int, num_nodes: int, entry: Callable[..., None]
) -> None:
    """Run `entry` (a module-level function the calling stage passes: the loop names no stage) on devices × num_nodes
    ranks with torchrun in a subprocess (restarted up to recipe.pretrain.max_restarts times); the resolved recipe is
    written to workdir/recipe.yaml for the ranks. A rank's known failure is raised again here as the same kind of
    error."""
    recipe_file, failure_file = workdir / RECIPE_FILE, workdir / FAILURE_FILE
    recipe_file.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    failure_file.unlink(missing_ok=True)
    restarts = recipe.pretrain.max_restarts if recipe.pretrain else 0
    target = f"{entry.__module__}:{entry.__name__}"
    command = torchrun_command(devices, num_nodes, target, recipe_file, workdir, inputs, failure_file, max_restarts=restarts)
    if num_nodes > 1:
        other = torchrun_command(
            devices, num_nodes, target, recipe_file, workdir, inputs, failure_file, "$NODE_RANK", max_restarts=restarts
        )
        line = " ".join(arg if "$NODE_RANK" in arg else shlex.quote(arg) for arg in other)
        print(f"dsv3: on every other node, with NODE_RANK set to its rank (1..{num_nodes - 1}), run: {line}", file=sys.stderr)
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    completed = subprocess.run(command, env=env, check=False, preexec_fn=lambda: die_with_parent(signal.SIGKILL))
    if completed.returncode == 0:
        return
    if failure_file.is_file():
        failure = Failure(**json.loads(failure_file.read_text()))
        error = {"diverged": TrainingDiverged, "input": InputError, "interrupted": KeyboardInterrupt}.get(failure.kind, StageFailed)
        raise error(failure.message)
    raise RuntimeError(
        f"torchrun training exited with code {completed.returncode}; its output is above, rerun the stage to resume "
        f"from {workdir / 'checkpoints'}"
    )


def die_with_parent(sig: int) -> None:
    """This process gets `sig` when its parent dies (Linux PR_SET_PDEATHSIG; elsewhere nothing)."""
    try:
        ctypes.CDLL(None).prctl(1, sig)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent was already gone
        os.kill(os.getpid(), sig)


def die_with_agent() -> None:
    """This rank is killed when its torchrun agent dies (torchrun starts ranks in sessions of their own, and the
    agent dies with the stage): a stage killed part-way leaves no rank training on into the folder its rerun
    resumes."""
    die_with_parent(signal.SIGKILL)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train in this torchrun rank: call ENTRY(recipe, workdir, inputs).")
    parser.add_argument("--entry", required=True, help="module:function to run (the calling stage's)")
    parser.add_argument("--recipe", required=True, help="recipe YAML (the stage writes its resolved recipe)")
    parser.add_argument("--workdir", required=True, help="the stage's folder")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=DIR", help="an upstream stage's folder")
    parser.add_argument("--failure-file", help="where a rank writes a known failure (kind and one line)")
    args = parser.parse_args(argv)
    die_with_agent()
    module, _, function = args.entry.partition(":")
    entry = getattr(importlib.import_module(module), function)
    inputs = {name: Path(folder) for name, _, folder in (item.partition("=") for item in args.input)}
    try:
        entry(load_recipe(args.recipe), Path(args.workdir), inputs)
    except BaseException as error:
        failure = classify(error)
        if failure.kind == "crash" or not args.failure_file:
            raise
        if os.environ.get("RANK", "0") == "0":
            write_json_atomic(args.failure_file, asdict(failure))
        print(f"rank {os.environ.get('RANK', '0')}: {failure.message}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
