"""Every example the command line and the README show runs, in order, against the smoke recipe: the examples of each
`dsv3 COMMAND --help` (but `ablations` and `probes`, tens of minutes of training, and `serve`, tested in test_serve.py) and the
`dsv3 ...` lines of the README's code blocks. Recipe tiny becomes smoke and runs/ a temporary folder."""

import argparse
import contextlib
import io
import re
import shlex

import pytest

import flows.runtime
from dsv3.cli import build_parser
from flows.cli import add_flow_commands, main
from tests.conftest import RECIPES, REPO

SKIPPED = ("ablations", "probes", "serve")
TAKES_RUNS_DIR = ("run", "report", "runs", "compare")


def help_examples() -> list[str]:
    parser = build_parser(add_flow_commands)
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    lines = []
    for name, sub in commands.choices.items():
        if name not in SKIPPED:
            lines += [line.strip() for line in (sub.epilog or "").splitlines() if line.startswith("  dsv3 ")]
    return lines


def readme_examples() -> list[str]:
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    lines = [line.removeprefix(".venv/bin/") for line in lines if line.startswith(("dsv3 ", ".venv/bin/dsv3 "))]
    synopsis = re.compile(r"\[|\b[A-Z]{2,}\b|\bR\b|  ")  # the command-line synopsis: metavariables, aligned columns
    return [line for line in lines if not synopsis.search(line)]


def as_smoke(line: str, runs_dir, tmp_path) -> list[str]:
    argv = shlex.split(line)[1:]
    out = []
    for arg in argv:
        arg = re.sub(r"^/tmp/", f"{tmp_path}/", arg)  # before the recipe: a checkout may itself lie under /tmp
        arg = arg.replace("recipes/tiny.yaml", str(RECIPES / "smoke.yaml"))
        arg = re.sub(r"^tiny(?=/|$)", "smoke", arg)
        arg = re.sub(r"^runs/tiny", f"{runs_dir}/smoke", arg)
        out.append(arg)
    if argv[0] in TAKES_RUNS_DIR and "--runs-dir" not in argv:
        out += ["--runs-dir", str(runs_dir)]
    return out


@pytest.mark.slow
def test_every_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(flows.runtime, "prefect_api", lambda runs_dir: contextlib.nullcontext())  # this process's
    runs_dir = tmp_path / "runs"
    examples = list(dict.fromkeys(help_examples() + readme_examples()))  # a line shown in both runs once
    assert any(e.startswith("dsv3 compare") for e in examples) and any(e.startswith("dsv3 chat") for e in examples)
    for line in examples:
        argv = as_smoke(line, runs_dir, tmp_path)
        if argv[0] == "chat":
            monkeypatch.setattr("sys.stdin", io.StringIO("what is 2 + 3?\nexit\n"))
        try:
            main(argv)
        except SystemExit as exit_info:
            raise AssertionError(f"`{line}` (as {argv}) exited {exit_info.code}: {capsys.readouterr().err[-500:]}") from None
        out, err = capsys.readouterr()
        if argv[0] == "chat":
            assert "warn" not in (out + err).lower(), err  # nothing from the libraries in the middle of a chat
