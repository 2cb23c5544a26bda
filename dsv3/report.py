"""The report card of one run: `runs/<recipe>/report.md` and a self-contained `report.html`.

It reads only what the stages left behind — each stage's manifest (`stage.json`: status, times, attempts,
metrics, the plots it wrote) — so it can be written at any moment: for a run that finished, failed, or is
still going. Layout: the environment (code version, hardware, libraries), a summary table, then one
section per stage of STAGE_ORDER with its status, time, tokens, every metric and its plots. A stage with
no manifest is shown as **missing**, one that did not complete as **running** or **failed**, and neither
gets numbers: an absent metric is never a zero.

report.md links the plots relative to the run folder (it sits there); report.html embeds them as base64
data URIs, so the one file can be mailed or attached to an MLflow run. Text from manifests is escaped:
the markdown renderer is run with raw HTML switched off.
"""

from __future__ import annotations

import base64
import html
import importlib.metadata
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

import markdown
from markdown.treeprocessors import Treeprocessor

from dsv3.config import STAGE_ORDER, load_recipe
from dsv3.io import write_text_atomic
from dsv3.stages import available_stages
from dsv3.stages.manifest import MANIFEST_NAME, Manifest, read_manifest

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
LIBRARIES = ("torch", "lightning", "transformers", "trl", "datasets", "tokenizers", "mlflow", "prefect")
# The metrics a reader looks for first, in order; a metric named like one of these plus a suffix
# (`passkey_accuracy_4x`) counts too. Stages whose metrics match none show their first few instead.
KEY_METRICS = (
    "val_loss",
    "validation_loss",
    "bits_per_byte",
    "maxvio_global",
    "mtp_acceptance_rate",
    "passkey_accuracy",
    "perplexity",
    "heldout_accuracy_sft",
    "heldout_accuracy_rl",
    "heldout_accuracy",
    "format_rate",
    "pair_accuracy",
    "reward_mean",
    "bytes_per_token_validation",
    "vocab_usage_validation",
)
SUMMARY_METRICS = 4
TOKEN_COUNT = re.compile(r"(?:^|_)tokens(?:_seen|_trained|_total)?$")  # counts, not `bytes_per_token`
IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".svg": "image/svg+xml",
}
NONE = "—"


@dataclass
class StageView:
    """One stage as the report sees it: its manifest, or why there is none."""

    name: str
    manifest: Manifest | None
    built: bool  # the stage's module exists in this version of dsv3
    unreadable: bool = False  # a stage.json is there but cannot be parsed

    @property
    def status(self) -> str:
        return "missing" if self.manifest is None else self.manifest.status

    @property
    def completed(self) -> bool:
        return self.status == "completed"


def resolve_run_dir(run: str | Path, runs_dir: str | Path = "runs") -> Path:
    """The run folder named by `run`: a folder, a recipe YAML (its name under runs_dir) or a recipe name."""
    path = Path(run)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return Path(runs_dir) / load_recipe(path).name
    if path.is_dir():
        return path
    if (Path(runs_dir) / str(run)).is_dir():
        return Path(runs_dir) / str(run)
    raise ValueError(
        f"{run}: neither a run folder nor a recipe name under {runs_dir} (give runs/<recipe> or --runs-dir)"
    )


def stage_views(run_dir: Path) -> list[StageView]:
    """Every stage of STAGE_ORDER, in order, with its manifest where it has a readable one."""
    built = set(available_stages())
    views = []
    for name in STAGE_ORDER:
        path = Path(run_dir) / name / MANIFEST_NAME
        manifest = read_manifest(path.parent)
        views.append(StageView(name, manifest, name in built, path.is_file() and manifest is None))
    return views


def environment(views: list[StageView]) -> list[tuple[str, str]]:
    """(label, value) rows: code version(s) from the manifests, this machine's hardware, library versions."""
    versions: dict[str, list[str]] = {}
    for view in views:
        if view.manifest is not None:
            versions.setdefault(view.manifest.code_version, []).append(view.name)
    rows = [
        ("code version", "; ".join(f"{v} ({', '.join(stages)})" for v, stages in versions.items()) or NONE),
        ("CPU", f"{_cpu_model()}, {_cpu_cores()}"),
        ("RAM", _ram()),
        ("GPU", _gpus()),
        ("Python", f"{platform.python_version()} ({platform.python_implementation()})"),
        ("OS", platform.platform()),
    ]
    for name in LIBRARIES:
        try:
            rows.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            rows.append((name, "not installed"))
    return rows


def report_markdown(run_dir: Path, link_plots: bool = True) -> str:
    """The report as markdown. Plots are images linked relative to `run_dir`, or with `link_plots=False`
    their paths as text (for viewers that cannot reach the files, such as Prefect's UI)."""
    run_dir = Path(run_dir).resolve()
    views = stage_views(run_dir)
    lines = [
        f"# Report card: {_md(run_dir.name)}",
        "",
        f"Run folder `{_code(str(run_dir))}`, report written {_utc(time.time())}.",
        "",
        "## Environment",
        "",
        "Hardware and libraries of the machine that wrote this report.",
        "",
        "| item | value |",
        "|---|---|",
        *(f"| {_md(label)} | {_md(value)} |" for label, value in environment(views)),
        "",
        "## Summary",
        "",
        "| stage | status | time | tokens | key metrics |",
        "|---|---|--:|--:|---|",
        *(_summary_row(view) for view in views),
        "",
    ]
    done = [v.manifest.duration_s or 0.0 for v in views if v.completed and v.manifest]
    total = f" in {_duration(sum(done))}" if done else ""
    lines += [f"{len(done)} of {len(views)} stages completed{total}.", ""]
    for view in views:
        lines += _stage_section(view, run_dir, link_plots)
    return "\n".join(lines)


def markdown_to_html(text: str, run_dir: Path, title: str) -> str:
    """A standalone HTML page of `text`; images under `run_dir` become data URIs, raw HTML is escaped."""
    md = markdown.Markdown(extensions=["tables", "toc"])
    md.preprocessors.deregister("html_block")  # text from manifests is shown, never interpreted
    md.inlinePatterns.deregister("html")
    md.treeprocessors.register(_EmbedImages(md, Path(run_dir).resolve()), "dsv3_embed_images", 5)
    md.treeprocessors.register(_MarkFailures(md), "dsv3_mark_failures", 4)
    body = md.convert(text)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Write `report.md` and `report.html` into `run_dir` (each atomically); returns their paths."""
    run_dir = Path(run_dir).resolve()
    if not any((run_dir / name / MANIFEST_NAME).is_file() for name in STAGE_ORDER):
        raise ValueError(
            f"{run_dir}: no stage manifest (<stage>/{MANIFEST_NAME}) found; run the pipeline first "
            "(dsv3 run --recipe RECIPE) or point at runs/<recipe>"
        )
    text = report_markdown(run_dir)
    page = markdown_to_html(text, run_dir, f"dsv3 report card: {run_dir.name}")
    return write_text_atomic(run_dir / REPORT_MD, text), write_text_atomic(run_dir / REPORT_HTML, page)


def key_metrics(metrics: dict[str, float]) -> list[str]:
    """Up to SUMMARY_METRICS names for the summary: the KEY_METRICS present, else the stage's first few."""
    names = [n for key in KEY_METRICS for n in sorted(metrics) if n == key or n.startswith(key + "_")]
    names = list(dict.fromkeys(names))  # a name matched by two keys counts once
    if not names:
        names = [n for n in metrics if n != "stage_seconds"]
    return names[:SUMMARY_METRICS]


def token_counts(metrics: dict[str, float]) -> list[str]:
    """Metric names that count tokens (`tokens_seen`, `train_tokens`), training counts first."""
    names = [n for n in metrics if TOKEN_COUNT.search(n) and not re.search(r"mean|per_|_per", n)]
    return sorted(names, key=lambda n: (n.startswith("val"), n))


def _summary_row(view: StageView) -> str:
    link = f"[{view.name}](#stage-{view.name})"
    if view.manifest is None:
        return f"| {link} | **missing** | {NONE} | {NONE} | {NONE} |"
    m = view.manifest
    status = _status(m)
    metrics = m.metrics if view.completed or m.failure else {}
    tokens = token_counts(metrics)
    keys = " · ".join(f"{_md(n)} {_value(metrics[n], 4)}" for n in key_metrics(metrics))
    return (
        f"| {link} | {status} | {_duration(m.duration_s)} | "
        f"{_value(metrics[tokens[0]], 4) if tokens else NONE} | {keys or NONE} |"
    )


def _stage_section(view: StageView, run_dir: Path, link_plots: bool) -> list[str]:
    lines = [f"## Stage: {view.name}", ""]
    m = view.manifest
    if m is None:
        why = (
            f"its `{MANIFEST_NAME}` cannot be read"
            if view.unreadable
            else "it has not run"
            if view.built
            else "it is not built in this version of dsv3"
        )
        return lines + [f"**missing**: {why}, so there is nothing to show.", ""]
    if m.status == "running":
        lines += [
            f"**running** since {_utc(m.started_at)} (attempt {m.attempts}): no metrics until it completes. "
            "If no process is running it, it stopped part-way: rerun the pipeline to resume it.",
            "",
        ]
    elif m.status == "failed":
        why = _md(m.failure["message"]) if m.failure else "no metrics"
        lines += [
            f"**failed** after {_duration(m.duration_s)} (attempt {m.attempts}): {why}. "
            + (
                "Its outputs are kept for inspection; change the recipe (or the check's threshold) and rerun."
                if m.failure and m.failure["kind"] == "check"
                else "Rerun the pipeline to resume it from its last checkpoint."
            ),
            "",
        ]
    if m.checks:
        lines += ["### Health checks", "", "| check | measured | limit | result |", "|---|--:|--:|---|"]
        lines += [
            f"| {_md(c['name'])} | {_value(c['value'], 4)} | {_value(c['limit'], 4)} | "
            f"{'passed' if c['passed'] else '**failed**'} |"
            for c in m.checks
        ]
        lines.append("")
    metrics = m.metrics if view.completed or m.failure else {}
    tokens = token_counts(metrics)
    lines += [
        "| item | value |",
        "|---|---|",
        f"| status | {m.status} |",
        f"| time | {_duration(m.duration_s)} |",
        f"| started | {_utc(m.started_at)} |",
        f"| finished | {_utc(m.finished_at)} |",
        f"| attempts | {m.attempts} |",
        *(f"| tokens ({_md(n)}) | {_value(metrics[n])} |" for n in tokens),
        f"| code version | {_md(m.code_version)} |",
        f"| MLflow run | {_md(m.mlflow_run_id or NONE)} |",
        "",
    ]
    if metrics:
        lines += ["### Metrics", "", "| metric | value |", "|---|--:|"]
        lines += [f"| {_md(name)} | {_value(value)} |" for name, value in metrics.items()]
        lines.append("")
    if m.artifacts:
        lines += ["### Plots", ""]
        for artifact in m.artifacts:
            lines += [_artifact(view.name, artifact, run_dir, link_plots), ""]
    return lines


def _status(m: Manifest) -> str:
    """completed / **failed**: the line / **running**, and completed runs whose failed checks were let through."""
    if m.status == "failed" and m.failure:
        return f"**failed**: {_md(m.failure['message'])}"
    if m.status != "completed":
        return f"**{m.status}**"
    if m.failed_checks:
        return f"completed, **checks failed** (not enforced): {_md(', '.join(c['name'] for c in m.failed_checks))}"
    return "completed"


def _artifact(stage: str, artifact: str, run_dir: Path, link_plots: bool) -> str:
    rel = f"{stage}/{artifact}"
    path = (run_dir / rel).resolve()
    label = _md(rel)
    if not path.is_relative_to(run_dir):
        return f"{label}: outside the run folder, not shown."
    if not path.is_file():
        return f"{label}: listed by the stage but not found."
    if not link_plots:
        return f"Plot `{_code(rel)}`"
    if path.suffix.lower() in IMAGE_TYPES:
        return f"![{label}]({quote(rel)})  \n{label}"
    return f"[{label}]({quote(rel)})"


class _EmbedImages(Treeprocessor):
    """Replace each <img> source (a path relative to the run folder) by a base64 data URI of the file."""

    def __init__(self, md: markdown.Markdown, run_dir: Path):
        super().__init__(md)
        self.run_dir = run_dir

    def run(self, root) -> None:
        for img in root.iter("img"):
            path = (self.run_dir / unquote(img.get("src", ""))).resolve()
            mime = IMAGE_TYPES.get(path.suffix.lower())
            if mime and path.is_relative_to(self.run_dir) and path.is_file():
                img.set("src", f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}")


class _MarkFailures(Treeprocessor):
    """Bold words that report a failure (failed, missing, running, checks failed) get the `bad` class: red."""

    def run(self, root) -> None:
        for strong in root.iter("strong"):
            if (strong.text or "").strip().lower() in ("failed", "checks failed", "missing", "running"):
                strong.set("class", "bad")


def _md(text: object) -> str:
    """Plain text for a markdown paragraph or table cell: HTML and markdown syntax escaped."""
    text = html.escape(str(text), quote=False)
    text = re.sub(r"([\\`*\[\]|])", r"\\\1", text)
    return re.sub(r"(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])", r"\\_", text)  # `val_loss` stays readable


def _code(text: str) -> str:
    return text.replace("`", "'")


def _value(value: object, digits: int = 6) -> str:
    """A metric as text: integers with thousands separators, other floats to `digits` significant figures."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _md(value)
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:.{digits}g}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return NONE
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _utc(timestamp: float | None) -> str:
    return NONE if timestamp is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_cores() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{os.cpu_count()} logical cores ({usable} usable)"


def _ram() -> str:
    try:
        return f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        return "unknown"


def _gpus() -> str:
    import torch

    if not torch.cuda.is_available():
        return "none (torch.cuda is not available)"
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(f"{props.name} ({props.total_memory / 2**30:.0f} GiB)")
    return f"{', '.join(gpus)}; CUDA {torch.version.cuda}"


_CSS = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1, h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: .25rem .6rem; }
th { background: #f4f4f4; }
code { background: #f4f4f4; padding: 0 .2rem; }
img { max-width: 100%; border: 1px solid #eee; }
.bad { color: #c62828; }
"""
