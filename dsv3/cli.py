"""The `dsv3` command line.

    dsv3 run --recipe recipes/tiny.yaml [--until STAGE] [--set key=value ...]   the pipeline (Prefect flow)
    dsv3 recipe recipes/tiny.yaml [--set key=value ...]                          print the resolved recipe
    dsv3 export-hf CKPT OUT / dsv3 import-hf SRC OUT                             transformers interop
    dsv3 report RUN [--runs-dir runs]                                            report card of a run
    dsv3 generate CKPT --prompt TEXT [--speculative] / dsv3 chat CKPT              stream text from a checkpoint

Bad input (a recipe, a path, a checkpoint) ends with one line on stderr naming what is wrong, exit code 2.
Set DSV3_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from dsv3.config import STAGE_ORDER, RecipeError, load_recipe

EXIT_BAD_INPUT = 2


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except (RecipeError, ValueError, FileNotFoundError) as err:
        if os.environ.get("DSV3_DEBUG"):
            raise
        print(f"dsv3: error: {err}".splitlines()[0], file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("dsv3: interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv3", description="The DeepSeek-V3 training recipe, end to end, from one command."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the pipeline (Prefect flow) for a recipe",
        description="Run the recipe's stages in order through the Prefect flow. Finished stages whose recipe "
        "sections and inputs are unchanged are skipped; a stage that stopped part-way resumes.",
    )
    run.add_argument("--recipe", default="recipes/tiny.yaml", help="recipe YAML (default: recipes/tiny.yaml)")
    run.add_argument("--until", choices=STAGE_ORDER, help="stop after this stage")
    _add_set(run)
    run.add_argument(
        "--runs-dir", default=os.environ.get("DSV3_RUNS_DIR", "runs"), help="where runs go (runs/)"
    )
    run.set_defaults(handler=_run)

    show = sub.add_parser("recipe", help="validate a recipe and print it resolved (bases and --set applied)")
    show.add_argument("recipe", help="recipe YAML")
    _add_set(show)
    show.set_defaults(handler=_show_recipe)

    export = sub.add_parser(
        "export-hf",
        help="write a checkpoint as a transformers deepseek_v3 directory",
        description="Convert a dsv3 save_pretrained directory into one that "
        "transformers.AutoModelForCausalLM.from_pretrained loads as deepseek_v3 (MTP layers after the last layer).",
    )
    export.add_argument("ckpt", help="dsv3 checkpoint directory (save_pretrained output)")
    export.add_argument("out", help="output directory")
    export.set_defaults(handler=_export_hf)

    imp = sub.add_parser(
        "import-hf",
        help="read a transformers deepseek_v3 directory into a dsv3 checkpoint",
        description="Convert a transformers / DeepSeek deepseek_v3 directory into a dsv3 checkpoint.",
    )
    imp.add_argument("src", help="deepseek_v3 directory (config.json + safetensors)")
    imp.add_argument("out", help="output directory")
    imp.set_defaults(handler=_import_hf)

    report = sub.add_parser(
        "report",
        help="write the report card of a run (runs/<recipe>/report.md and report.html)",
        description="Write runs/<recipe>/report.md and a self-contained report.html (plots embedded): "
        "environment, a summary table, and per stage its status, time, tokens, metrics and plots. "
        "Stages that have not run, or did not complete, are shown as missing, running or failed.",
    )
    report.add_argument(
        "run",
        metavar="RUN",
        help="run folder (runs/<recipe>), or a recipe name or recipe YAML under --runs-dir",
    )
    report.add_argument(
        "--runs-dir", default=os.environ.get("DSV3_RUNS_DIR", "runs"), help="where runs go (runs/)"
    )
    report.set_defaults(handler=_report)
    _add_generation_commands(sub)
    return parser


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set pretrain.lr=3e-4 (repeatable; values parsed as YAML)",
    )


def _run(args: argparse.Namespace) -> None:
    load_recipe(args.recipe, args.overrides)  # fail fast, before Prefect starts
    runs_dir = Path(args.runs_dir).resolve()
    os.environ.setdefault("PREFECT_HOME", str(runs_dir / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    from flows.pipeline import pipeline

    pipeline(recipe_path=args.recipe, overrides=args.overrides, until=args.until, runs_dir=str(runs_dir))


def _show_recipe(args: argparse.Namespace) -> None:
    recipe = load_recipe(args.recipe, args.overrides)
    print(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), end="")


def _export_hf(args: argparse.Namespace) -> None:
    from dsv3.model.hf import export_hf

    export_hf(args.ckpt, args.out)
    print(f"wrote {args.out}")


def _report(args: argparse.Namespace) -> None:
    from dsv3.report import resolve_run_dir, write_report

    for path in write_report(resolve_run_dir(args.run, args.runs_dir)):
        print(f"wrote {path}")


def _add_generation_commands(sub) -> None:
    """`dsv3 generate` and `dsv3 chat` (dsv3.infer.generate): absorbed MLA decoding, optional MTP speculation."""
    generate = sub.add_parser(
        "generate",
        help="stream a continuation of a prompt from a checkpoint",
        description="Load a checkpoint (a save_pretrained directory with tokenizer files, e.g. runs/tiny/pretrain/model) "
        "and print the continuation of --prompt token by token. Decoding attends over the compressed MLA cache with "
        "absorbed up-projections; --speculative drafts with the MTP module and verifies (greedy, same output).",
    )
    chat = sub.add_parser(
        "chat",
        help="talk to a checkpoint through its chat template",
        description="Interactive chat: each line you type is a user turn, the reply streams back; the conversation "
        "is kept and formatted with the tokenizer's chat template. Ends on EOF (Ctrl-D) or 'exit'.",
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


def _import_hf(args: argparse.Namespace) -> None:
    from dsv3.model.hf import import_hf

    import_hf(args.src, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
