import pytest

from dsv3.seeds_report import read_seed_run, rl_gain, seeds_html, seeds_markdown, write_seeds_report
from dsv3.store.manifest import Manifest, StageKey, write_manifest

KEY = StageKey("r", {}, "c")


def fake_run(root, sft_accuracy, rl_accuracy, rl_status="completed", reward_check_passes=True):
    write_manifest(root / "sft", Manifest("sft", "completed", KEY, "v", metrics={"heldout_accuracy": sft_accuracy, "unlisted": 1.0}))
    checks = [{"name": "reward.min_pair_accuracy", "passed": reward_check_passes, "value": 0.9, "threshold": 0.8}]
    write_manifest(root / "reward", Manifest("reward", "completed", KEY, "v", metrics={"heldout_pair_accuracy": 0.9}, checks=checks))
    metrics = {"heldout_accuracy_sft": sft_accuracy, "heldout_accuracy_rl": rl_accuracy}
    write_manifest(root / "rl", Manifest("rl", rl_status, KEY, "v", metrics=metrics if rl_status == "completed" else {}))
    return root


def test_table_has_mean_sd_and_every_seed(tmp_path):
    runs = [
        read_seed_run(s, fake_run(tmp_path / str(s), sft, rl))
        for s, sft, rl in [(1, 0.30, 0.40), (2, 0.20, 0.32), (3, 0.25, 0.33)]
    ]
    text = seeds_markdown(runs, "dsv3 run --seeds 3")
    assert "| sft | heldout_accuracy | 0.25 ± 0.05 (3) | 0.3 | 0.2 | 0.25 |" in text
    assert "unlisted" not in text  # headline metrics only
    gain = rl_gain(runs)
    assert gain.values == pytest.approx({1: 0.10, 2: 0.12, 3: 0.08})
    assert gain.mean == pytest.approx(0.10) and gain.sd == pytest.approx(0.02)
    assert gain.verdict == "holds" and "holds" in text
    assert "<td>0.25 ± 0.05 (3)</td>" in seeds_html(runs, "cmd")
    md, page = write_seeds_report(tmp_path / "out", runs, "cmd")
    assert md.read_text() == seeds_markdown(runs, "cmd") and page.is_file()


def test_failed_stages_are_named_and_never_averaged(tmp_path):
    runs = [
        read_seed_run(1, fake_run(tmp_path / "1", 0.3, 0.4)),
        read_seed_run(2, fake_run(tmp_path / "2", 0.2, 0.1, rl_status="failed", reward_check_passes=False)),
    ]
    assert runs[1].failed == {"reward": "failed checks", "rl": "failed"}
    text = seeds_markdown(runs, "cmd")
    assert "| rl | heldout_accuracy_rl | 0.4 ± — (1) | 0.4 | — |" in text
    assert "seed 2: reward failed checks; seed 2: rl failed" in text
    assert rl_gain(runs).verdict == "not resolved (one seed)"


def test_a_gain_within_noise_is_not_resolved(tmp_path):
    runs = [read_seed_run(s, fake_run(tmp_path / str(s), 0.3, rl)) for s, rl in [(1, 0.4), (2, 0.25), (3, 0.33)]]
    assert rl_gain(runs).verdict == "not resolved"
