"""The installed `dsv3` script: the library's commands (dsv3.cli) plus the ones that run flows.

    dsv3 run --recipe recipes/tiny.yaml [--until STAGE] [--set key=value ...] [--runs-dir runs]

`dsv3 run` validates the recipe and the runs folder before anything starts, takes the runs folder's lock (one run
per folder), starts Prefect's API server in its own session (flows.runtime) and runs the pipeline flow. It exits 0
when every stage completed, 1 when a stage failed its checks or diverged (one line naming the check and value),
2 on bad input, 130 on Ctrl-C (the stage records the interruption; rerun to resume).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dsv3.cli import add_runs_dir_option, add_set_option, exit_with, flow_runs_dir, runs_folder
from dsv3.cli import main as dsv3_main
from dsv3.config import STAGE_ORDER
from dsv3.errors import Failure


def main(argv: list[str] | None = None) -> None:
    dsv3_main(argv, add_commands=add_flow_commands)


def add_flow_commands(sub) -> None:
    run = sub.add_parser(
        "run",
        help="run the pipeline (Prefect flow) for a recipe",
        description="Run the recipe's stages in order through the Prefect flow. Finished stages whose recipe "
        "sections, inputs, code and data are unchanged are skipped; a stage that stopped part-way resumes; a stage "
        "that fails its health checks stops the run (exit code 1).",
        epilog="examples:\n"
        "  dsv3 run --recipe recipes/tiny.yaml --until tokenizer --set tokenizer.vocab_size=1024\n"
        "  dsv3 run --recipe recipes/tiny.yaml --until pretrain --name lr1e-3 --set pretrain.lr_peak=1e-3\n"
        "  dsv3 run --recipe recipes/tiny.yaml --until pretrain --seeds 2\n"
        "  dsv3 run --recipe recipes/tiny.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--recipe", default="recipes/tiny.yaml", help="recipe YAML (default: recipes/tiny.yaml)")
    run.add_argument("--until", choices=STAGE_ORDER, help="stop after this stage")
    add_set_option(run)
    run.add_argument(
        "--name", help="the variant's folder name, runs/<recipe>/<name> (default: from the overrides and a digest)"
    )
    run.add_argument(
        "--seeds", type=int, default=1,
        help="run the pipeline for the recipe's seed s0 and s0+1, ... (N in all), then write the table of every "
        "stage's headline metrics as mean ± sd with each seed's values to runs/<recipe>/seeds-<variant>/seeds.md "
        "and .html (default 1: one run, no table)",
    )
    add_runs_dir_option(run)
    run.set_defaults(handler=run_pipeline)

    serve = sub.add_parser(
        "serve",
        help="serve the pipeline as a Prefect deployment: start runs from the Prefect UI",
        description="Register the pipeline as the deployment dsv3-pipeline/dsv3 on the Prefect server at PREFECT_API_URL "
        "(make serve starts one at http://127.0.0.1:4200 with the MLflow UI beside it) and run the flow runs started "
        "there — from the UI's Run button, with the parameters recipe_path, until, overrides and name — until "
        "Ctrl-C.",
        epilog="example:\n  make serve        # the Prefect and MLflow UIs and this command, together",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_runs_dir_option(serve)
    serve.set_defaults(handler=serve_pipeline)

    ablations = sub.add_parser(
        "ablations",
        help="run the ablation pretrainings over seeds and compare them with the papers",
        description="Run every arm recipe in --recipes (FP8 at hidden 512: blockwise / per-tensor / BF16; loss-free / "
        "aux-loss / no balancing; MTP on / off) with --seeds seeds through the stage code, reusing finished (arm, seed) "
        "runs, and write runs/ablations/ablations.md and .html: each claim of the papers beside ours as mean ± sd "
        "over the seeds (each run read as the mean of its validation evaluations after half its steps), the paired "
        "difference, and 'holds' only when its 95% confidence interval excludes zero on the paper's side ('not "
        "resolved' otherwise, with the seeds that would decide it); every seed's values; loss and MaxVio curves.",
        epilog="examples:\n"
        "  dsv3 ablations --recipes recipes/ablations --runs-dir runs --seeds 3\n"
        "  dsv3 ablations --only balancing --seeds 5          # two more seeds of one ablation, the first three reused",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ablations.add_argument("--recipes", default="recipes/ablations", help="folder of arm recipes (recipes/ablations)")
    ablations.add_argument(
        "--seeds", type=int, default=3, help="seeds per arm: the recipes' seed s0, s0+1, ... (default 3; 1 resolves nothing)"
    )
    ablations.add_argument(
        "--only", type=lambda text: [n for n in text.split(",") if n], default=None, metavar="NAME[,NAME]",
        help="run these ablations only (fp8, balancing, mtp); the others show as missing",
    )
    add_runs_dir_option(ablations)
    ablations.set_defaults(handler=run_ablations)

    probes = sub.add_parser(
        "probes",
        help="run the probes: copying/retrieval and YaRN on synthetic rows, GRPO on a task SFT gets partly right",
        description="What the tiny pipeline cannot show at its scale, each effect where 2 CPU cores can show it: "
        "recipes/probes/copy.yaml trains a 2-layer model on synthetic repeated-segment and key-value rows (induction "
        "gain over training, held-out key retrieval at its length and at 4x with plain RoPE and with YaRN); "
        "recipes/probes/grpo.yaml runs the pipeline up to GRPO on a task the SFT model answers partly right (reward "
        "over steps with its spread, held-out accuracy SFT vs RL). Writes runs/probes/probes.md and .html; finished "
        "work is reused.",
        epilog="examples:\n"
        "  dsv3 probes --only copy                      # about 2.5 minutes on 2 cores\n"
        "  dsv3 probes --recipes recipes/probes --runs-dir runs --seeds 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    probes.add_argument("--recipes", default="recipes/probes", help="folder of probe recipes (recipes/probes)")
    probes.add_argument(
        "--only", type=lambda text: [n for n in text.split(",") if n], default=None, metavar="NAME[,NAME]",
        help="run these probes only (copy, grpo)",
    )
    probes.add_argument("--seeds", type=int, default=1, help="seeds of the GRPO probe's pipeline (default 1)")
    add_runs_dir_option(probes)
    probes.set_defaults(handler=run_probes)


@contextmanager
def orchestrated(runs_dir: Path, command: str) -> Iterator[None]:
    """The runs folder's lock, then Prefect's API server, for as long as a flow runs."""
    from dsv3.store.lock import runs_lock
    from flows.runtime import prefect_api

    with runs_lock(runs_dir, command), prefect_api(runs_dir):
        yield


def run_ablations(args: argparse.Namespace) -> None:
    from flows.ablations import ablations, arm_seeds, load_arms, select_ablations

    arms = load_arms(args.recipes)  # bad recipes and options fail here, before Prefect starts
    arm_seeds(arms, [stem for a in select_ablations(args.only) for stem in a.arms if stem in arms], args.seeds)
    runs_dir = runs_folder(args.runs_dir)
    with orchestrated(runs_dir, f"dsv3 ablations --recipes {args.recipes} --seeds {args.seeds}"):
        state = ablations(
            recipes_dir=args.recipes, runs_dir=flow_runs_dir(runs_dir), seeds=args.seeds, only=args.only, return_state=True
        )
        outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, BaseException):
        raise outcome
    if state.is_failed():
        exit_with(Failure(**outcome["failure"]))


def run_probes(args: argparse.Namespace) -> None:
    from flows.probes import probe_recipes, probes

    probe_recipes(args.recipes, args.only)  # bad recipes and options fail here, before Prefect starts
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: run at least one seed")
    runs_dir = runs_folder(args.runs_dir)
    with orchestrated(runs_dir, f"dsv3 probes --recipes {args.recipes}"):
        state = probes(recipes_dir=args.recipes, runs_dir=flow_runs_dir(runs_dir), only=args.only, seeds=args.seeds, return_state=True)
        outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, BaseException):
        raise outcome
    if state.is_failed():
        exit_with(Failure(**outcome["failure"]))


def run_pipeline(args: argparse.Namespace) -> None:
    from dsv3.config import load_recipe
    from dsv3.stages import check_data_files

    recipe = load_recipe(args.recipe, args.overrides, args.name)  # bad input fails here, before Prefect starts
    from flows.pipeline import stages_to_run

    check_data_files(recipe, stages_to_run(recipe, args.until))
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: run at least one seed")
    runs_dir = runs_folder(args.runs_dir)
    command = f"dsv3 run --recipe {args.recipe}" + "".join(f" --set {o}" for o in args.overrides)
    with orchestrated(runs_dir, command):
        from flows.pipeline import pipeline
        from flows.seeds import pipeline_over_seeds

        options = dict(recipe_path=args.recipe, overrides=args.overrides, until=args.until, runs_dir=flow_runs_dir(runs_dir), name=args.name)
        if args.seeds > 1:
            state = pipeline_over_seeds(**options, seeds=args.seeds, return_state=True)
        else:
            state = pipeline(**options, return_state=True)
        outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, BaseException):
        raise outcome
    if state.is_failed():
        exit_with(Failure(**outcome["failure"]))



def serve_pipeline(args: argparse.Namespace) -> None:
    """Serve the pipeline flow as a deployment until interrupted (needs a Prefect server: PREFECT_API_URL)."""
    import os

    api = os.environ.get("PREFECT_API_URL")
    if not api:
        raise ValueError("dsv3 serve needs a Prefect server: run `make serve` (or set PREFECT_API_URL to one)")
    from flows.runtime import wait_until_up

    wait_until_up(api)
    runs_dir = runs_folder(args.runs_dir)
    from flows.runtime import prefect_home

    prefect_home(runs_dir)
    from flows.pipeline import pipeline

    print(launch_message(api), flush=True)
    pipeline.serve(
        name="dsv3",
        parameters={"recipe_path": "recipes/tiny.yaml", "runs_dir": flow_runs_dir(runs_dir)},
        tags=["dsv3"],
        description="The dsv3 pipeline: recipe_path (a recipe YAML relative to the repository), until (a stage), "
        "overrides (a list of key=value), name (the variant's folder). Runs write to " + flow_runs_dir(runs_dir) + ".",
        print_starting_message=False,  # Prefect's omits PREFECT_API_URL: in a fresh shell it finds no deployment
    )


def launch_message(api: str) -> str:
    """How to start a run of the served deployment: the UI, or a command that works as printed in a fresh shell."""
    import sys

    prefect = Path(sys.executable).with_name("prefect")
    return (
        f"Serving dsv3-pipeline/dsv3: start runs from {api.removesuffix('/api')}/deployments, or from a shell with\n"
        f"  PREFECT_API_URL={api} {prefect} deployment run dsv3-pipeline/dsv3 --param until=tokenizer"
    )


if __name__ == "__main__":
    main()
