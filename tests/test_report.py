"""The report card: every section present for a smoke run (a real tokenizer stage plus a hand-written
pretrain manifest with a real PNG), missing / failed / running stages shown as such and never as zeros,
plots embedded in the HTML, text escaped, and `dsv3 report` failing cleanly on a folder without a run."""

import base64
import json
import re
import time
from pathlib import Path

import pytest

from dsv3.cli import main
from dsv3.config import STAGE_ORDER, load_recipe
from dsv3.plotting import plt
from dsv3.report import REPORT_HTML, REPORT_MD, token_counts, write_report
from dsv3.stages import headline, run_stage
from dsv3.store.manifest import Manifest, StageKey, write_manifest
from dsv3.store.runs import record_run, run_root
from tests.conftest import RECIPES

KEY = StageKey("recipe", {}, "code")
ODD_NAME = "<b>x&y</b>|z"


def _manifest(stage: str, status: str, seconds: float, **fields) -> Manifest:
    now = time.time()
    times = {"started_at": now - seconds, "finished_at": now if status != "running" else None}
    return Manifest(stage, status, KEY, "abc1234", **times, **fields)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """runs/smoke: the real tokenizer stage, a completed pretrain with a plot, a failed sft, a running reward."""
    runs = tmp_path_factory.mktemp("runs")
    recipe = load_recipe(RECIPES / "smoke.yaml")
    run_stage("tokenizer", recipe, runs)
    root = record_run(runs, recipe, RECIPES / "smoke.yaml")
    assert root == run_root(runs, recipe)
    plots = root / "pretrain" / "plots"
    plots.mkdir(parents=True)
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([4.0, 3.1, 2.7])
    fig.savefig(plots / "loss curve.png")
    plt.close(fig)
    metrics = {"final_val_loss": 2.7182, "tokens": 65536.0, "final_val_maxvio_global": 0.25, ODD_NAME: 1.5}
    write_manifest(
        root / "pretrain",
        _manifest("pretrain", "completed", 125.0, metrics=metrics, artifacts=["plots/loss curve.png"]),
    )
    evaluated = {"results": {"dsv3_bpb": {"bits_per_byte": 2.53, "bits_per_byte_stderr": "N/A"}}, "samples": {"dsv3_bpb": 12}}
    (root / "pretrain" / "lm_eval.json").write_text(json.dumps(evaluated))  # as `dsv3 eval` writes it
    write_manifest(root / "sft", _manifest("sft", "failed", 7.0, attempts=2))
    write_manifest(root / "reward", _manifest("reward", "running", 3.0))
    return root


@pytest.fixture(scope="module")
def report(run) -> tuple[str, str]:
    md_path, html_path = write_report(run)
    assert (md_path, html_path) == (run / REPORT_MD, run / REPORT_HTML)
    return md_path.read_text(), html_path.read_text()


def _section(md: str, stage: str) -> str:
    return md.split(f"## Stage: {stage}\n", 1)[1].split("\n## ", 1)[0].strip()


def _summary_row(md: str, stage: str) -> list[str]:
    row = next(line for line in md.splitlines() if line.startswith(f"| [{stage}]"))
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_every_section_is_present(run, report):
    md, html = report
    assert md.startswith(f"# Report card: smoke / {run.name}\n")
    for heading in ["## What was trained", "## Summary", *(f"## Stage: {s}" for s in STAGE_ORDER), "## Environment"]:
        assert f"\n{heading}\n" in md
    for stage in STAGE_ORDER:
        assert f'<h2 id="stage-{stage}">Stage: {stage}</h2>' in html
        assert f'href="#stage-{stage}"' in html  # the summary links to each section
    for item in ("code version", "CPU", "RAM", "GPU", "Python", "torch", "lightning", "trl", "prefect"):
        assert f"\n| {item} | " in md
    assert "abc1234 (pretrain, sft, reward)" in md  # code versions read from the manifests


def test_completed_stages_show_time_tokens_metrics(report):
    md, _ = report
    tokenizer = _summary_row(md, "tokenizer")
    assert tokenizer[1] == "completed" and tokenizer[2].endswith(" s")
    assert "bytes_per_token_validation" in tokenizer[3]  # the tokenizer stage's real headline metric
    assert _summary_row(md, "pretrain") == [
        "[pretrain](#stage-pretrain)",
        "completed",
        "2 min 05 s",
        "final_val_loss 2.718 · final_val_maxvio_global 0.25 · tokens 65,536",
    ]
    pretrain = _section(md, "pretrain")
    assert "| tokens | 65,536 |" in pretrain
    assert "| final_val_loss | 2.7182 |" in pretrain
    trained = md.split("## What was trained", 1)[1].split("## Summary", 1)[0]
    assert "| variant | " in trained and "| tokens (pretrain) | 65.54K |" in trained
    assert "![pretrain/plots/loss curve.png](pretrain/plots/loss%20curve.png)" in pretrain
    assert "### lm-evaluation-harness (`dsv3 eval`)" in pretrain and "| dsv3_bpb | 12 | bits_per_byte | 2.53 |" in pretrain


def test_a_stage_that_has_not_run_is_not_run_not_zeros(report):
    md, _ = report
    for stage in ("extend", "rl"):
        row = _summary_row(md, stage)
        assert row[1:] == ["*not run*", "—", "—"]  # not a failure: e.g. a run with --until
        section = _section(md, stage)
        assert section.startswith("*not run*")
        assert not re.search(r"\b\d", section) and "| metric |" not in section


def test_failed_and_running_stages_show_no_metrics(report):
    md, _ = report
    assert _summary_row(md, "sft")[1:] == ["**failed**", "7.0 s", "—"]
    assert _section(md, "sft").startswith("**failed** after 7.0 s (attempt 2)")
    assert _summary_row(md, "reward")[1:] == ["**running**", "—", "—"]
    assert _section(md, "reward").startswith("**running** since ")
    for stage in ("sft", "reward"):
        assert "### Metrics" not in _section(md, stage)


def test_html_embeds_plots_and_escapes_text(run, report):
    _, html = report
    match = re.search(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert match, "the pretrain plot is not embedded"
    assert base64.b64decode(match.group(1)) == (run / "pretrain/plots/loss curve.png").read_bytes()
    assert "<b>x" not in html
    assert "<td>&lt;b&gt;x&amp;y&lt;/b&gt;|z</td>" in html  # the pipe stays in its cell


def test_headline_metrics_and_token_counts_pick_known_names():
    metrics = {"lr": 1e-3, "passkey_accuracy_after_L1024": 0.1, "passkey_accuracy_after_L256": 0.9, "final_val_loss": 3.0}
    assert list(headline("extend", metrics)) == ["final_val_loss", "passkey_accuracy_after_L256", "passkey_accuracy_after_L1024"]
    counts = {"val_tokens": 1.0, "tokens_seen": 2.0, "bytes_per_token": 3.0, "tokens_per_second": 4.0}
    counts |= {"heldout_mean_completion_tokens": 65.0, "tokens_per_s_median": 3000.0}
    assert token_counts(counts) == ["tokens_seen", "val_tokens"]


def test_cli_report_by_recipe_name(run, capsys):
    main(["report", "smoke", "--runs-dir", str(run.parent.parent)])
    assert capsys.readouterr().out.splitlines() == [f"wrote {run / REPORT_MD}", f"wrote {run / REPORT_HTML}"]


def test_cli_report_without_manifests_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run of that name" in err
    assert not (tmp_path / REPORT_MD).exists() and not (tmp_path / REPORT_HTML).exists()


def test_cli_report_help_answers(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--help"])
    assert exit_info.value.code == 0
    assert "usage: dsv3 report" in capsys.readouterr().out


def test_compare_prints_plain_text_and_writes_escaped_markdown(tmp_path):
    """The terminal gets `[0.1, 0.5]`, not markdown's `\\[0.1, 0.5\\]`; the HTML page's markdown stays escaped."""
    from dsv3.report import compare_markdown
    from dsv3.store.runs import RunView

    a = RunView(tmp_path / "smoke" / "a", {"resolved": {"data": {"weights": [0.1, 0.5]}}}, {})
    b = RunView(tmp_path / "smoke" / "b_1", {"resolved": {"data": {"weights": [0.2, 0.5]}}}, {})
    assert "| data.weights | [0.1, 0.5] | [0.2, 0.5] |" in compare_markdown(a, b, plain=True)
    assert "# smoke/a vs smoke/b_1" in compare_markdown(a, b, plain=True)
    assert r"| data.weights | \[0.1, 0.5\] | \[0.2, 0.5\] |" in compare_markdown(a, b)


def test_compare_html_overlays_both_runs_losses_and_links_their_mlflow_runs(tmp_path, monkeypatch):
    """`dsv3 compare`'s page: one plot with both runs' pretraining losses (embedded), and each run's MLflow parent
    run linked — or said to be missing."""
    import dsv3.train.plots as plots
    from dsv3.html_page import markdown_to_html
    from dsv3.report import compare_curves_and_links
    from dsv3.store.runs import RunView
    from dsv3.tracking import Tracker

    monkeypatch.delenv("DSV3_MLFLOW_UI", raising=False)
    runs = tmp_path / "runs"
    a, b = RunView(runs / "smoke" / "a", {}, {}), RunView(runs / "smoke" / "b", {}, {})
    for run, scale in ((a, 1.0), (b, 0.9)):
        (run.root / "pretrain").mkdir(parents=True)
        history = [{"step": s, "train/ce": scale * 6 / s} for s in range(1, 9)] + [{"step": 8, "val/loss": scale}]
        (run.root / "pretrain" / "train_result.json").write_text(json.dumps({"history": history}))
    tracker = Tracker(runs, experiment="dsv3-smoke")
    with tracker.pipeline_run("smoke/a") as parent_id:
        pass
    drawn = []
    real = plots.plot_compared_losses
    monkeypatch.setattr(plots, "plot_compared_losses", lambda histories, *rest: drawn.append(list(histories)) or real(histories, *rest))
    image = runs / "compare" / "smoke_a__vs__smoke_b__losses.png"
    image.parent.mkdir()

    text = compare_curves_and_links(a, b, runs, image)
    assert drawn == [["A: smoke/a", "B: smoke/b"]] and image.is_file()
    assert f"- A: [smoke/a](http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs/{parent_id}?" in text
    assert "- B: smoke/b (no MLflow run)" in text
    page = markdown_to_html(text, image.parent, "a vs b")
    assert "data:image/png;base64," in page and f'href="http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs/{parent_id}' in page
