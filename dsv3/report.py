"""The report card of one run: `runs/<recipe>/report.md` and a self-contained `report.html`.

It reads only what the stages left behind — each stage's manifest (`stage.json`: status, times, attempts,
metrics, the plots it wrote) — so it can be written at any moment: for a run that finished, failed, or is
still going. Layout: the environment (code version, hardware, libraries), a summary table, then one
section per stage (built-in, or registered and run) with its status, time, tokens, every metric and its plots. A
stage with no manifest is shown as *not run* (e.g. past `--until`), one whose manifest cannot be read as
**missing**, one that did not complete as **running** or **failed**, and none of them gets numbers: an absent metric
is never a zero.

report.md links the plots relative to the run folder (it sits there); report.html (dsv3.html_page) embeds them as
base64 data URIs, so the one file can be mailed or attached to an MLflow run. Text from manifests is escaped: in the
markdown here (_md) and by the renderer, which runs with raw HTML switched off.
"""

from __future__ import annotations

import html
import importlib.metadata
import json
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from dsv3.config import STAGE_ORDER, load_recipe, stage_order
from dsv3.eval.harness import read_results
from dsv3.html_page import IMAGE_TYPES, markdown_to_html
from dsv3.io import write_text_atomic
from dsv3.model import DSV3Config, count_parameters
from dsv3.stages import available_stages, get_stage, headline
from dsv3.store.manifest import MANIFEST_NAME, Manifest, read_manifest
from dsv3.store.runs import RunView, read_run_info, recipe_differences, resolve_run

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
LIBRARIES = ("torch", "lightning", "transformers", "trl", "datasets", "tokenizers", "mlflow", "prefect")
TOKEN_COUNT = re.compile(r"(?:^|_)tokens(?:_seen|_trained|_total)?$")  # counts, not `bytes_per_token`
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
        if self.manifest is None:
            return "missing" if self.unreadable else "not run"
        return self.manifest.status

    @property
    def completed(self) -> bool:
        return self.status == "completed"


def resolve_run_dir(run: str | Path, runs_dir: str | Path = "runs") -> Path:
    """The run folder named by `run`: a variant folder, `<recipe>/<variant>`, a recipe name (its latest variant) or
    a recipe YAML (the latest variant of its name)."""
    path = Path(run)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        run = load_recipe(path).name
    if path.is_dir() and any((path / name / MANIFEST_NAME).is_file() for name in stage_order()):
        return path
    return resolve_run(run, runs_dir)


def trained(run_dir: Path) -> list[tuple[str, str]]:
    """(label, value) rows of what was trained: recipe, variant and overrides (run.json), data, model shape and
    parameter counts (the pretrained model's config), tokens per stage (their manifests)."""
    info = read_run_info(run_dir)
    resolved = info.get("resolved") or {}
    rows = [
        ("recipe", f"{info.get('recipe', run_dir.parent.name)} ({info.get('recipe_path') or 'path unknown'})"),
        ("variant", run_dir.name),
        ("overrides", " ".join(info.get("overrides") or []) or "none"),
        ("seed", str(resolved.get("seed", NONE))),
    ]
    data = resolved.get("data") or {}
    if data:
        where = {"stdlib": "Python standard library sources", "local": ", ".join(data.get("paths") or [])}
        rows.append(("data", f"{where.get(data['source'], data.get('hf_name'))}; rows of {data['seq_len']} tokens, FIM rate {data['fim_rate']}"))
    config = model_config(run_dir)
    if config is not None:
        counts = count_parameters(config)
        rows += [
            ("model", _model_shape(config)),
            ("parameters", f"{_count(counts['total'])} total, {_count(counts['active'])} active per token, MTP {_count(counts['mtp'])}"),
        ]
    for name in stage_order():
        manifest = read_manifest(run_dir / name)
        tokens = (manifest.metrics.get("tokens") or manifest.metrics.get("tokens_trained")) if manifest else None
        if tokens:
            rows.append((f"tokens ({name})", f"{_count(tokens)}"))
    return rows


def model_config(run_dir: Path) -> DSV3Config | None:
    """The trained model's config (the latest model folder of the run), or None before pretraining finished."""
    for name in reversed(stage_order()):
        path = run_dir / name / "model" / "config.json"
        if path.is_file() and json.loads(path.read_text()).get("model_type") == "dsv3":
            return DSV3Config.from_json_file(path)
    return None


def _model_shape(c: DSV3Config) -> str:
    moe = c.num_hidden_layers - c.first_k_dense_replace
    return (
        f"d = {c.hidden_size}, {c.num_hidden_layers} layers ({c.first_k_dense_replace} dense, {moe} MoE: "
        f"{c.n_shared_experts} shared + {c.n_routed_experts} routed experts, {c.num_experts_per_tok} active), "
        f"{c.num_attention_heads} MLA heads (d_c = {c.kv_lora_rank}), MTP depth {c.num_nextn_predict_layers}, "
        f"vocabulary {c.vocab_size}, RoPE {c.rope_parameters.get('rope_type', 'default')}"
    )


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def stage_views(run_dir: Path) -> list[StageView]:
    """Every built-in stage and every registered one the run has, in order, with its manifest where it has a readable
    one."""
    built = set(available_stages())
    views = []
    for name in stage_order():
        path = Path(run_dir) / name / MANIFEST_NAME
        if name not in STAGE_ORDER and not path.parent.exists():
            continue  # a plugin's stage this run does not have
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
        f"# Report card: {_md(run_dir.parent.name)} / {_md(run_dir.name)}",
        "",
        f"Run folder `{_code(run_dir.parent.name + '/' + run_dir.name)}` in the runs folder, report written {_utc(time.time())}.",
        "",
        "## What was trained",
        "",
        "| item | value |",
        "|---|---|",
        *(f"| {_md(label)} | {_md(value)} |" for label, value in trained(run_dir)),
        "",
        "## Summary",
        "",
        "The metrics that say whether each stage worked; a failed health check is marked **failed**.",
        "",
        "| stage | status | time | metrics |",
        "|---|---|--:|---|",
        *(_summary_row(view) for view in views),
        "",
    ]
    done = [v.manifest.duration_s or 0.0 for v in views if v.completed and v.manifest]
    total = f" in {_duration(sum(done))}" if done else ""
    lines += [f"{len(done)} of {len(views)} stages completed{total}.", ""]
    for view in views:
        lines += _stage_section(view, run_dir, link_plots)
    lines += [
        "## Environment",
        "",
        "Hardware and libraries of the machine that wrote this report.",
        "",
        "| item | value |",
        "|---|---|",
        *(f"| {_md(label)} | {_md(value)} |" for label, value in environment(views)),
        "",
    ]
    return "\n".join(lines)


def compare_markdown(a: RunView, b: RunView, plain: bool = False) -> str:
    """Two runs side by side: where their resolved recipes differ, then every stage's headline metrics (B − A).
    `plain`: the cells as they are, for a terminal (else escaped for markdown)."""
    cell = str if plain else _md
    lines = [
        f"# {cell(a.label)} vs {cell(b.label)}",
        "",
        "## Recipes",
        "",
        "| setting | A | B |",
        "|---|---|---|",
        *(f"| {cell(k)} | {cell(va)} | {cell(vb)} |" for k, (va, vb) in recipe_differences(a, b).items()),
        "",
        "## Metrics",
        "",
        "| stage | metric | A | B | B − A |",
        "|---|---|--:|--:|--:|",
    ]
    for stage in stage_order():
        ma, mb = a.manifests.get(stage), b.manifests.get(stage)
        shown_a = headline(stage, ma.metrics) if ma else {}
        shown_b = headline(stage, mb.metrics) if mb else {}
        for name in list(dict.fromkeys([*shown_a, *shown_b])):
            va, vb = shown_a.get(name), shown_b.get(name)
            diff = _value(vb - va, 4) if va is not None and vb is not None else NONE
            lines.append(f"| {stage} | {cell(name)} | {_value(va, 4) if va is not None else NONE} | "
                         f"{_value(vb, 4) if vb is not None else NONE} | {diff} |")  # fmt: skip
        if ma is not None and mb is not None and ma.key == mb.key:
            lines.append(f"| {stage} | (the same stage folder: shared, not retrained) | | | |")
    lines += ["", f"Status: A {', '.join(f'{s} {a.status(s)}' for s in a.manifests)}; "
              f"B {', '.join(f'{s} {b.status(s)}' for s in b.manifests)}.", ""]  # fmt: skip
    return "\n".join(lines)


def compare_curves_and_links(a: RunView, b: RunView, runs_dir: Path, image: Path) -> str:
    """What `dsv3 compare` adds to its HTML page: both runs' pretraining losses in one plot (written to `image`,
    embedded by markdown_to_html when it lies under its folder) and a link to each run's MLflow parent run."""
    from dsv3.stages.pretrain import RESULT
    from dsv3.tracking import parent_run_page
    from dsv3.train.plots import plot_compared_losses

    lines = ["## Loss curves", ""]
    histories = {}
    for side, run in (("A", a), ("B", b)):
        result = run.root / "pretrain" / RESULT
        if result.is_file():  # keyed by side too: a run compared with itself still draws two
            histories[f"{side}: {run.label}"] = json.loads(result.read_text()).get("history", [])
    if any(histories.values()):
        plot_compared_losses(histories, image, f"Pretraining loss: {a.label} (A) vs {b.label} (B)")
        lines += [f"![pretraining losses of both runs]({quote(image.name)})", ""]
    if len(histories) < 2:
        lines += [f"Pretraining losses recorded by: {', '.join(map(_md, histories)) or 'neither run'}.", ""]
    lines += ["## MLflow", ""]
    for side, run in (("A", a), ("B", b)):
        page = parent_run_page(runs_dir, run.root.parent.name, run.root.name)
        lines.append(f"- {side}: [{_md(run.label)}]({page})" if page else f"- {side}: {_md(run.label)} (no MLflow run)")
    return "\n".join([*lines, ""])


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Write `report.md` and `report.html` into `run_dir` (each atomically); returns their paths."""
    run_dir = Path(run_dir).resolve()
    if not any((run_dir / name / MANIFEST_NAME).is_file() for name in stage_order()):
        raise ValueError(
            f"{run_dir}: no stage manifest (<stage>/{MANIFEST_NAME}) found; run the pipeline first "
            "(dsv3 run --recipe RECIPE) or point at runs/<recipe>"
        )
    text = report_markdown(run_dir)
    page = markdown_to_html(text, run_dir, f"dsv3 report card: {run_dir.name}")
    return write_text_atomic(run_dir / REPORT_MD, text), write_text_atomic(run_dir / REPORT_HTML, page)


def token_counts(metrics: dict[str, float]) -> list[str]:
    """Metric names that count tokens (`tokens_seen`, `train_tokens`), training counts first."""
    names = [n for n in metrics if TOKEN_COUNT.search(n) and not re.search(r"mean|per_|_per", n)]
    return sorted(names, key=lambda n: (n.startswith("val"), n))


def _summary_row(view: StageView) -> str:
    link = f"[{view.name}](#stage-{view.name})"
    if view.manifest is None:
        return f"| {link} | {'**missing**' if view.unreadable else '*not run*'} | {NONE} | {NONE} |"
    m = view.manifest
    metrics = headline(view.name, m.metrics) if (view.completed or m.failure) and view.built else {}
    failed = {c["name"] for c in m.failed_checks}
    shown = " · ".join(f"{_md(n)} {_value(v, 4)}" for n, v in metrics.items())
    checks = " · ".join(f"**failed** {_md(c)}" for c in sorted(failed))
    return f"| {link} | {_status(m)} | {_duration(m.duration_s)} | {' · '.join(x for x in (shown, checks) if x) or NONE} |"


def _stage_section(view: StageView, run_dir: Path, link_plots: bool) -> list[str]:
    lines = [f"## Stage: {view.name}", ""]
    m = view.manifest
    if m is None:
        if view.unreadable:
            return lines + [f"**missing**: its `{MANIFEST_NAME}` cannot be read, so there is nothing to show.", ""]
        why = "it has not run in this variant" if view.built else "it is not built in this version of dsv3"
        return lines + [f"*not run*: {why}, so there is nothing to show.", ""]
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
        *(f"| {_md(n)} | {_value(metrics[n])} |" for n in tokens),
        f"| code version | {_md(m.code_version)} |",
        f"| MLflow run | {_md(m.mlflow_run_id or NONE)} |",
        "",
    ]
    if metrics:
        lines += ["### Metrics", "", "| metric | value |", "|---|--:|"]
        lines += [f"| {_md(name)} | {_value(value)} |" for name, value in metrics.items()]
        lines.append("")
        note = get_stage(view.name).note if view.built else ""
        lines += [_md(note), ""] if note else []
    lines += _lm_eval_section(run_dir / view.name)
    if m.artifacts:
        lines += ["### Plots", ""]
        for artifact in m.artifacts:
            lines += [_artifact(view.name, artifact, run_dir, link_plots), ""]
    return lines


def _lm_eval_section(stage_dir: Path) -> list[str]:
    """The stage's `dsv3 eval` results (lm_eval.json), when it has been evaluated."""
    evaluated = read_results(stage_dir)
    if evaluated is None:
        return []
    lines = ["### lm-evaluation-harness (`dsv3 eval`)", "", "| task | examples | metric | value |", "|---|--:|---|--:|"]
    for task, values in evaluated["results"].items():
        lines += [f"| {_md(task)} | {evaluated['samples'][task]} | {_md(name)} | {_value(value, 4)} |"
                  for name, value in values.items() if not name.endswith("_stderr")]  # fmt: skip
    return lines + [""]


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
    path = Path(os.path.normpath(run_dir / rel))  # lexically: the stage folders are links into the store
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
