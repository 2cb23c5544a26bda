"""dsv3/probes/grpo.py on hand-built results: reward windows with their spread, accuracies with binomial standard
errors, and the RL − SFT verdict against the noise; the plot draws every seed."""

from dsv3.probes.grpo import markdown, plot


def result(seed: int, sft: float, rl: float, rewards: list[float]) -> dict:
    steps = [{"step": i + 1, "reward": r, "reward_std": 0.2, "correct": r / 2, "correct_std": 0.1} for i, r in enumerate(rewards)]
    metrics = {"heldout_accuracy_sft": sft, "heldout_accuracy_rl": rl, "heldout_pass_at_2_sft": sft + 0.1,
               "heldout_pass_at_2_rl": rl + 0.1}
    return {"seed": seed, "steps": steps, "metrics": metrics, "heldout": 100, "eval_k": 2, "sft_epochs": 8,
            "task": "linear, 1 step(s), numbers up to 9", "rl_steps": 10, "group": 8, "prompts": 4}


def test_table_reads_windows_accuracies_and_the_verdict(tmp_path):
    rising = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    text = markdown([result(1, 0.30, 0.32, rising)])
    row = [line for line in text.splitlines() if line.startswith("| 1 |")][0]
    assert "| 0.300 ± 0.158 | 0.800 ± 0.158 | 0.150 ± 0.079 | 0.400 ± 0.079 |" in row
    assert "| 30.0% ± 4.6% | 32.0% ± 4.7% | 40.0% ± 4.9% | 42.0% ± 4.9% |" in row
    assert "+2.0% (one seed) (no gain beyond the noise" in text  # 2% < 2 × 4.6%
    gain = markdown([result(1, 0.30, 0.50, rising), result(2, 0.32, 0.50, rising), result(3, 0.28, 0.49, rising)])
    assert "+19.7% ± 1.5% over 3 seeds (a gain beyond the noise" in gain
    assert markdown([]).startswith("missing")
    assert plot([result(1, 0.3, 0.3, rising), result(2, 0.3, 0.3, rising)], tmp_path / "g.png").stat().st_size > 10_000
