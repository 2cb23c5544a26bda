"""Multi-process pretraining as a `torchrun` subprocess (DESIGN.md, "Known traps": Lightning's DDP re-executes
the script, so it never runs inside the Prefect task).

The stage calls `launch_torchrun` when pretrain.devices × pretrain.num_nodes > 1; every rank then runs
`python -m dsv3.stages.launch --recipe R --runs-dir D`, which trains (`dsv3.stages.pretrain.train`) and exits.
On a cluster, after `make tokenizer`, run on every node (shared runs folder; MASTER_ADDR, MASTER_PORT, NODE_RANK
set as for torchrun):

    python -m torch.distributed.run --nnodes N --nproc-per-node G --node-rank $NODE_RANK \\
        --rdzv-backend c10d --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT -m dsv3.stages.launch --recipe R --runs-dir runs

then `make pretrain` on one node finishes the stage from the final checkpoint (plots, metrics, the model folder).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import yaml

from dsv3.config import PretrainSection, Recipe, load_recipe

RECIPE_FILE = "recipe.yaml"


def world_size(cfg: PretrainSection) -> int:
    return cfg.devices * cfg.num_nodes


def inside_torchrun() -> bool:
    """True in a process that torchrun (or another launcher setting LOCAL_RANK) started."""
    return "LOCAL_RANK" in os.environ


def torchrun_command(cfg: PretrainSection, recipe_file: Path, runs_dir: Path) -> list[str]:
    """The torchrun command line for this node: standalone on one node, c10d rendezvous across several."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cfg.devices}"]
    if cfg.num_nodes == 1:
        command += ["--standalone", "--nnodes=1"]
    else:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK") if k not in os.environ]
        if missing:
            raise ValueError(
                f"pretrain.num_nodes={cfg.num_nodes} needs {', '.join(missing)} in the environment on every node"
            )
        command += [
            f"--nnodes={cfg.num_nodes}",
            f"--node-rank={os.environ['NODE_RANK']}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        ]
    return command + ["-m", "dsv3.stages.launch", "--recipe", str(recipe_file), "--runs-dir", str(runs_dir)]


def launch_torchrun(recipe: Recipe, workdir: Path) -> None:
    """Train with torchrun in a subprocess; the resolved recipe is written to workdir/recipe.yaml for the ranks."""
    recipe_file = workdir / RECIPE_FILE
    recipe_file.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    command = torchrun_command(recipe.pretrain, recipe_file, workdir.parent.parent)
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    completed = subprocess.run(command, env=env, check=False)
    if completed.returncode != 0:
        raise RuntimeError(
            f"torchrun pretraining exited with code {completed.returncode}; its output is above, "
            f"rerun the stage to resume from {workdir / 'checkpoints'}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the pretrain stage in this torchrun rank.")
    parser.add_argument("--recipe", required=True, help="recipe YAML")
    parser.add_argument("--runs-dir", required=True, help="the runs folder (runs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    args = parser.parse_args(argv)
    from dsv3.stages.pretrain import train  # the training code, imported only in the ranks

    recipe = load_recipe(args.recipe, args.set)
    root = Path(args.runs_dir).resolve() / recipe.name
    train(recipe, root / "pretrain", root / "tokenizer" / "tokenizer")


if __name__ == "__main__":
    main()
