"""The `dsv3` command line: the library's commands. `flows.cli` adds the orchestrated ones (`dsv3 run`) and is the
installed `dsv3` script, so the library never imports the flows.

    dsv3 recipe recipes/tiny.yaml [--set key=value ...]                          print the resolved recipe
    dsv3 plan recipes/v2-lite.yaml --devices 16 --expert-parallel 8              memory per GPU, DDP / FSDP / EP
    dsv3 export-hf CKPT OUT / dsv3 import-hf SRC OUT                             transformers interop
    dsv3 report RUN [--runs-dir runs]                                            report card of a run
    dsv3 generate CKPT --prompt TEXT [--speculative] / dsv3 chat CKPT              stream text from a checkpoint
    dsv3 eval MODEL [--tasks T ...] [--limit N]                                  lm-evaluation-harness, local tasks

How a command ends (dsv3.errors): bad input — a recipe, a path, a checkpoint — one line on stderr naming what is
wrong, exit code 2; a stage that failed its checks or diverged, or a full disk: one line, exit code 1; Ctrl-C:
"interrupted", exit code 130. No traceback unless DSV3_DEBUG=1.

Commands import what they use when they run (the recipe schema imports torch and transformers): `dsv3 --help` stays
well under two seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from dsv3.errors import Failure, Interrupted, classify
from dsv3.io import write_text_atomic

DEBUG = "DSV3_DEBUG"


def main(argv: list[str] | None = None, add_commands: Callable | None = None) -> None:
    """Parse `argv` and run its command; on failure print one line and exit with the failure's code.
    `add_commands(subparsers)` adds commands defined outside the library (flows.cli: `run`)."""
    parser = build_parser(add_commands)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        args.handler(args)
    except SystemExit:
        raise
    except BaseException as error:
        failure = classify(error)
        if os.environ.get(DEBUG) or failure.kind == "crash":
            raise
        exit_with(failure, 143 if isinstance(error, Interrupted) or type(error).__name__ == "TerminationSignal" else None)


def exit_with(failure: Failure, code: int | None = None) -> None:
    """Print the failure's one line on stderr and exit with its code."""
    label = {"input": "error", "interrupted": "interrupted"}.get(failure.kind, "failed")
    text = failure.message if failure.kind == "interrupted" else f"{label}: {failure.message}"
    print(f"dsv3: {text}", file=sys.stderr)
    sys.exit(code or failure.exit_code)


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted()


def build_parser(add_commands: Callable | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv3", description="The DeepSeek-V3 training recipe, end to end, from one command."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if add_commands is not None:
        add_commands(sub)

    show = sub.add_parser(
        "recipe",
        help="validate a recipe and print it resolved (bases and --set applied)",
        epilog="example:\n  dsv3 recipe recipes/tiny.yaml --set pretrain.lr_peak=1e-3",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("recipe", help="recipe YAML")
    add_set_option(show)
    show.set_defaults(handler=_show_recipe)

    plan = sub.add_parser(
        "plan",
        help="per-device memory of a recipe's pretraining under DDP, FSDP and FSDP+EP, before renting GPUs",
        description="Build the recipe's model on the meta device and print, per device, the bytes of parameters, "
        "gradients, AdamW state, weight copies and an activation estimate for one micro-batch, under DDP, FSDP2 and "
        "FSDP2 with the routed experts split over --expert-parallel ranks (dsv3/train/plan.py says what is counted).",
        epilog="examples:\n  dsv3 plan recipes/small.yaml --devices 8\n"
        "  dsv3 plan recipes/v2-lite.yaml --devices 16 --expert-parallel 8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument("recipe", help="recipe YAML")
    plan.add_argument(
        "--devices", type=int, default=None, help="ranks, all nodes together (default: pretrain.devices × num_nodes)"
    )
    plan.add_argument(
        "--expert-parallel",
        type=int,
        default=None,
        metavar="E",
        help="ranks the routed experts are split over (default: pretrain.expert_parallel, else 1)",
    )
    plan.add_argument(
        "--fsdp-replicate",
        type=int,
        default=None,
        metavar="R",
        help="HSDP replicas: FSDP shards over devices / R ranks (default: pretrain.fsdp_replicate, else 1)",
    )
    plan.add_argument("--strategy", choices=["ddp", "fsdp"], default=None, help="only this strategy's rows")
    plan.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    add_set_option(plan)
    plan.set_defaults(handler=_plan)

    export = sub.add_parser(
        "export-hf",
        help="write a model folder as a transformers deepseek_v3 directory",
        description="Convert a stage's model folder into a deepseek_v3 directory that AutoModelForCausalLM, "
        "AutoTokenizer, lm-eval and TRL load as written on transformers 5 and 4.x: config, weights "
        "(MTP layers in mtp.safetensors), generation config, tokenizer and chat template.",
        epilog="example:\n  dsv3 export-hf runs/tiny/latest/pretrain/model /tmp/tiny-deepseek-v3",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("ckpt", help="dsv3 model folder with its tokenizer (a stage's model/)")
    export.add_argument("out", help="output directory")
    export.set_defaults(handler=_export_hf)

    imp = sub.add_parser(
        "import-hf",
        help="read a transformers deepseek_v3 directory into a dsv3 checkpoint",
        description="Convert a transformers / DeepSeek deepseek_v3 directory into a dsv3 checkpoint.",
        epilog="example:\n  dsv3 import-hf /tmp/tiny-deepseek-v3 /tmp/tiny-dsv3",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imp.add_argument("src", help="deepseek_v3 directory (config.json + safetensors)")
    imp.add_argument("out", help="output directory")
    imp.set_defaults(handler=_import_hf)

    report = sub.add_parser(
        "report",
        help="write the report card of a run (runs/<recipe>/<variant>/report.md and report.html)",
        description="Write runs/<recipe>/<variant>/report.md and a self-contained report.html (plots embedded): "
        "environment, a summary table, and per stage its status, time, tokens, metrics and plots. "
        "Stages that have not run, or did not complete, are shown as not run, running or failed.",
        epilog="examples:\n  dsv3 report tiny\n  dsv3 report runs/tiny/latest",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument(
        "run",
        metavar="RUN",
        help="a run: its folder (runs/<recipe>/<variant>), <recipe>/<variant>, a recipe name (its latest run) or a recipe YAML",
    )
    add_runs_dir_option(report)
    report.set_defaults(handler=_report)

    runs = sub.add_parser(
        "runs",
        help="list the runs: recipe, variant, overrides, each stage's status, headline metrics",
        description="List every variant folder under --runs-dir, newest first: recipe/variant, when it last ran, its "
        "overrides, each stage's status (completed, failed, interrupted, running; * = a health check failed but was not "
        "enforced), why a stage failed (the check and its measured value) and a few headline metrics. A runs folder "
        "copied or moved elsewhere has its MLflow store's artifact locations moved with it.",
        epilog="example:\n  dsv3 runs --runs-dir runs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_runs_dir_option(runs)
    runs.set_defaults(handler=_runs)

    compare = sub.add_parser(
        "compare",
        help="two runs side by side: recipe differences and every stage's headline metrics",
        description="Print where two runs' resolved recipes differ and each stage's headline metrics side by side "
        "(B − A), and write the same as an HTML page under <runs-dir>/compare/, with both runs' pretraining losses in one "
        "plot and links to their MLflow runs.",
        epilog="example (after the examples of dsv3 run --help):\n  dsv3 compare tiny/lr1e-3 tiny",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("a", metavar="A", help="a run: <recipe>/<variant>, a recipe name (its latest) or a folder")
    compare.add_argument("b", metavar="B", help="the other run")
    add_runs_dir_option(compare)
    compare.set_defaults(handler=_compare)
    _add_generation_commands(sub)
    _add_eval_command(sub)
    return parser


def add_runs_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runs-dir", default=os.environ.get("DSV3_RUNS_DIR", "runs"), help="where runs go (default: runs/)"
    )


def runs_folder(path: str | Path) -> Path:
    """The runs folder, created if needed; a one-line error when it is a file or cannot be written."""
    path = Path(path).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--runs-dir {path} is a file, not a folder: pass a folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--runs-dir {path}: cannot create it ({err.strerror}); pass a writable folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--runs-dir {path} is not writable: pass a folder you can write to")
    return path


def flow_runs_dir(path: Path) -> str:
    """The runs folder as a flow parameter, which Prefect stores (in runs/prefect/): relative to the working
    directory when it lies inside it, as recipe_path is, so that a flow run retried from a copy of the repository
    writes into the copy; else absolute."""
    path, here = Path(path).resolve(), Path.cwd().resolve()
    return os.path.relpath(path, here) if path.is_relative_to(here) else str(path)


def add_set_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set pretrain.lr_peak=3e-4 (repeatable; values parsed as YAML)",
    )


def _show_recipe(args: argparse.Namespace) -> None:
    from dsv3.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), end="")


def _plan(args: argparse.Namespace) -> None:
    from dsv3.config import load_recipe
    from dsv3.train.plan import GiB, fewest_devices, parameter_groups, plan, planned_model

    recipe = load_recipe(args.recipe, args.overrides)
    model = planned_model(recipe)
    if args.devices is not None:
        devices = args.devices
    else:
        devices = recipe.pretrain.devices * recipe.pretrain.num_nodes if recipe.pretrain else 1
    replicate = model.fsdp_replicate if args.fsdp_replicate is None else args.fsdp_replicate
    rows = plan(recipe, devices, args.expert_parallel, args.strategy, model, replicate)
    groups = parameter_groups(model.weights)
    mtp = groups["MTP modules"]
    print(
        f"{recipe.name}: {(sum(groups.values()) - mtp) / 1e9:.3f}B parameters + {mtp / 1e9:.3f}B in the MTP modules (meta device); "
        f"vocabulary {model.config.vocab_size} from {model.vocab_source}"
    )
    print("  " + ", ".join(f"{name} {count / 1e9:.3f}B" for name, count in groups.items()))
    source = "the pretrain section's defaults: the recipe has none" if model.pretrain_defaults else "pretrain"
    print(
        f"precision {model.precision}, optimizer_states_bf16 {str(model.optimizer_states_bf16).lower()}, "
        f"micro-batch {model.micro_batch_size} × {model.seq_len} tokens, global batch {model.global_batch_size}, "
        f"gradient_sync {model.gradient_sync}, activation_checkpointing {model.activation_checkpointing}"
        + (f" every {model.activation_checkpointing_every}" if model.activation_checkpointing == "selective" else "")
        + f" ({source}); fp32 master weights except under bf16-true, their bf16 / FP8 compute copies under 'copies'; "
        "activations are an estimate (dsv3/train/plan.py says what each column counts; pipeline parallelism is not "
        "modelled)"
    )
    print()
    print("| strategy | devices | E | params GiB | grads GiB | optimizer GiB | copies GiB | activations GiB | total GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        gib = (row.params, row.grads, row.optimizer, row.copies, row.activations, row.total)
        print(f"| {row.strategy} | {row.devices} | {row.expert_parallel} | " + " | ".join(f"{b / GiB:.2f}" for b in gib) + " |")
    print()
    gpu = args.gpu_gib * GiB
    print(f"fits on one {args.gpu_gib:g} GiB GPU: " + ", ".join(f"{r.strategy} {'yes' if r.total <= gpu else 'no'}" for r in rows))
    fewest = [
        (r.strategy, fewest_devices(model, "ddp" if r.strategy == "DDP" else "fsdp", r.expert_parallel, gpu, replicate=replicate))
        for r in rows
    ]
    print(
        f"fewest {args.gpu_gib:g} GiB GPUs: " + ", ".join(f"{name} {n or 'none'}" for name, n in fewest)
        + " (no margin counted for the CUDA context, NCCL buffers and fragmentation: leave a few GiB)"
    )


def _export_hf(args: argparse.Namespace) -> None:
    from dsv3.model.hf import export_hf

    export_hf(args.ckpt, args.out)
    print(f"wrote {args.out}")


def _report(args: argparse.Namespace) -> None:
    from dsv3.report import resolve_run_dir, write_report

    for path in write_report(resolve_run_dir(args.run, args.runs_dir)):
        print(f"wrote {path}")


def _runs(args: argparse.Namespace) -> None:
    from dsv3.mlstore import relocate_store
    from dsv3.stages import headline
    from dsv3.store.runs import list_runs

    relocate_store(args.runs_dir)  # a copied runs folder: MLflow (`make ui`) shows its own artifacts from now on
    found = list_runs(args.runs_dir)
    if not found:
        print(f"no runs under {args.runs_dir} yet: dsv3 run --recipe recipes/tiny.yaml")
        return
    for run in found:
        updated = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.info.get("updated", 0)))
        stages = " ".join(f"{name}:{run.status(name)}" for name in run.manifests)
        metrics = {f"{name}/{k}": v for name, m in run.manifests.items() if m for k, v in list(headline(name, m.metrics).items())[:1]}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(f"{run.label}  ({updated}; overrides: {' '.join(run.info.get('overrides') or []) or 'none'})")
        print(f"    {stages}")
        for name in run.manifests:
            if reason := run.reason(name):
                print(f"    {name}: {run.status(name)} ({reason})")
        if shown:
            print(f"    {shown}")


def _compare(args: argparse.Namespace) -> None:
    from dsv3.html_page import markdown_to_html
    from dsv3.report import compare_curves_and_links, compare_markdown
    from dsv3.store.runs import resolve_run, view

    a, b = (view(resolve_run(spec, args.runs_dir)) for spec in (args.a, args.b))
    print(compare_markdown(a, b, plain=True))
    out = Path(args.runs_dir) / "compare" / f"{a.label}__vs__{b.label}".replace("/", "_")
    out.parent.mkdir(parents=True, exist_ok=True)
    image = out.with_name(out.name + "__losses.png")
    text = compare_markdown(a, b) + "\n" + compare_curves_and_links(a, b, Path(args.runs_dir), image)
    html_path = out.with_suffix(".html")
    write_text_atomic(html_path, markdown_to_html(text, out.parent, f"dsv3: {a.label} vs {b.label}"))
    print(f"wrote {html_path}")


def _add_generation_commands(sub) -> None:
    """`dsv3 generate` and `dsv3 chat` (dsv3.infer.generate): absorbed MLA decoding, optional MTP speculation."""
    generate = sub.add_parser(
        "generate",
        help="stream a continuation of a prompt from a checkpoint",
        description="Load a checkpoint (a save_pretrained directory with tokenizer files, e.g. runs/tiny/latest/pretrain/"
        "model) and print the continuation of --prompt token by token. Decoding attends over the compressed MLA cache "
        "with absorbed up-projections; --speculative drafts with the MTP module and verifies (greedy, same output).",
        epilog="examples:\n"
        '  dsv3 generate runs/tiny/latest/pretrain/model --prompt "def main(" --max-new-tokens 32\n'
        '  dsv3 generate runs/tiny/latest/pretrain/model --prompt "import os" --max-new-tokens 32 --speculative',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chat = sub.add_parser(
        "chat",
        help="talk to a checkpoint through its chat template",
        description="Interactive chat: each line you type is a user turn, the reply streams back; the conversation "
        "is kept and formatted with the tokenizer's chat template. Ends on EOF (Ctrl-D) or 'exit'.",
        epilog="example:\n  dsv3 chat runs/tiny/latest/sft/model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for parser, default_tokens in ((generate, 128), (chat, 256)):
        parser.add_argument(
            "ckpt", metavar="CKPT", help="checkpoint directory (save_pretrained + tokenizer files)"
        )
        parser.add_argument(
            "--max-new-tokens",
            type=int,
            default=default_tokens,
            help=f"tokens to generate at most (default {default_tokens})",
        )
        parser.add_argument(
            "--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples"
        )
        parser.add_argument(
            "--speculative",
            action="store_true",
            help="MTP speculative decoding (greedy only); reports the acceptance rate",
        )
        parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    generate.add_argument("--prompt", required=True, help="text to continue")
    generate.set_defaults(handler=_generate)
    chat.set_defaults(handler=_chat)


def _generate(args: argparse.Namespace) -> None:
    from transformers.utils.logging import disable_progress_bar

    from dsv3.infer.generate import generate, load_checkpoint, prompt_ids, report_speed

    disable_progress_bar()  # the weight-loading bar would interleave with the streamed text
    model, tokenizer = load_checkpoint(args.ckpt)
    ids = prompt_ids(tokenizer, args.prompt)
    print(args.prompt, end="", flush=True)
    result = generate(
        model, tokenizer, ids, args.max_new_tokens, args.temperature, args.speculative, args.seed
    )
    report_speed(result, args.speculative)


def _chat(args: argparse.Namespace) -> None:
    from transformers.utils.logging import disable_progress_bar

    from dsv3.infer.generate import chat, load_checkpoint

    disable_progress_bar()
    model, tokenizer = load_checkpoint(args.ckpt)
    print("dsv3 chat: type a message; 'exit' or Ctrl-D ends", file=sys.stderr)
    chat(
        model,
        tokenizer,
        lambda: input("> "),
        args.max_new_tokens,
        args.temperature,
        args.speculative,
        args.seed,
    )


def _add_eval_command(sub) -> None:
    """`dsv3 eval` (dsv3.eval.harness): lm-evaluation-harness with the project's local tasks."""
    evaluate = sub.add_parser(
        "eval",
        help="run lm-evaluation-harness on a model folder with the project's own tasks (offline)",
        description="Evaluate a stage's model folder (exported to a temporary deepseek_v3 folder first) or an export-hf "
        "folder with lm-evaluation-harness and the tasks in dsv3/eval/lm_eval_tasks: dsv3_math (held-out math "
        "problems in the SFT chat format, exact match of the boxed answer), dsv3_bpb (bits per byte of the recipe "
        "corpus's validation split), dsv3_arith_mc (the same problems, 4 integer choices). Prints lm-eval's table, "
        "writes lm_eval.json to the stage folder (the folder itself for an export) and logs the metrics to the "
        "stage's MLflow run. Nothing is downloaded.",
        epilog="examples:\n  dsv3 eval runs/tiny/latest/sft/model --limit 50\n"
        "  dsv3 eval /tmp/tiny-deepseek-v3 --tasks dsv3_bpb --recipe recipes/tiny.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("model", metavar="MODEL", help="a stage's model folder or an export-hf folder")
    evaluate.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="tasks to run (default: all three)")
    evaluate.add_argument("--limit", type=int, default=None, help="score the first N examples of each task (default: all)")
    evaluate.add_argument(
        "--recipe", default=None,
        help="recipe whose corpus and problems the tasks use (default: the run's own when MODEL is "
        "runs/<recipe>/<variant>/<stage>/model, else recipes/tiny.yaml)",
    )  # fmt: skip
    evaluate.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default 8)")
    evaluate.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_set_option(evaluate)
    evaluate.set_defaults(handler=_eval)


def _eval(args: argparse.Namespace) -> None:
    import logging

    from dsv3.config import load_recipe, validate_recipe
    from dsv3.eval.harness import TASKS, check_tasks, evaluate

    tasks = check_tasks(args.tasks or TASKS)
    model = Path(args.model)
    run_info = model.parent.parent / "run.json"  # runs/<recipe>/<variant>/<stage>/model, through the variant's link
    if args.recipe is None and run_info.is_file() and not args.overrides:
        recipe = validate_recipe(json.loads(run_info.read_text())["resolved"])
    else:
        recipe = load_recipe(args.recipe or "recipes/tiny.yaml", args.overrides)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from lm_eval.utils import make_table

    results, path, run_id = evaluate(model, recipe, tasks, args.limit, args.batch_size, args.device)
    print(make_table(results))
    print(f"wrote {path}" + (f"; logged to MLflow run {run_id}" if run_id else ""))


def _import_hf(args: argparse.Namespace) -> None:
    from dsv3.model.hf import import_hf

    import_hf(args.src, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
