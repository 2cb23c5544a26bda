"""The paper's FP8 claim at our scale (DeepSeek-V3 section 3.3, docs/paper.md, "FP8 training": relative loss error
against BF16 below 0.25%): tiny-recipe pretraining with fp8-blockwise against bf16-mixed, same seed and data.

Run the pair one after the other (the pretrain stage is the real one; both share seed and data), then this script:

    export OMP_NUM_THREADS=1
    .venv/bin/dsv3 run --recipe recipes/tiny.yaml --until pretrain --runs-dir /tmp/fp8runs \\
        --set name=tiny-bf16 --set pretrain.precision=bf16-mixed
    .venv/bin/dsv3 run --recipe recipes/tiny.yaml --until pretrain --runs-dir /tmp/fp8runs \\
        --set name=tiny-fp8 --set pretrain.precision=fp8-blockwise
    .venv/bin/python benchmarks/fp8_loss_gap.py --runs-dir /tmp/fp8runs

It prints a markdown table: validation loss at every validation point of each run and its relative gap to the
bf16 run, (run − bf16) / bf16, the final training loss, and the stage's training time. An optional third run
(`--reference`, e.g. the same recipe in 32-true) shows how far a mere change of rounding moves the final loss at
this scale, the yardstick for the FP8 gap.
"""

import argparse
import json
from pathlib import Path

PAPER_BOUND = 0.0025


def load(runs_dir: Path, name: str) -> tuple[dict, dict]:
    workdir = runs_dir / name / "pretrain"
    manifest, result = workdir / "stage.json", workdir / "train_result.json"
    if not manifest.is_file() or not result.is_file():
        raise SystemExit(f"{workdir} holds no finished pretrain stage: run the pair first (see --help)")
    return json.loads(manifest.read_text())["metrics"], json.loads(result.read_text())


def validation_losses(result: dict) -> dict[int, float]:
    return {int(r["step"]): r["val/loss"] for r in result["history"] if "val/loss" in r}


def gap(fp8: float, bf16: float) -> str:
    return f"{(fp8 - bf16) / bf16 * 100:+.3f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", type=Path, default=Path("/tmp/fp8runs"))
    parser.add_argument("--bf16", default="tiny-bf16", help="run name of the bf16-mixed run")
    parser.add_argument("--fp8", default="tiny-fp8", help="run name of the fp8-blockwise run")
    parser.add_argument("--reference", default=None, help="optional run name of another precision, e.g. 32-true")
    args = parser.parse_args()
    names = [args.bf16, args.fp8] + ([args.reference] if args.reference else [])
    runs = {name: load(args.runs_dir, name) for name in names}
    (bf16_metrics, bf16), (fp8_metrics, _) = runs[args.bf16], runs[args.fp8]
    for name, (_, result) in runs.items():
        if (result["tokens"], result["steps"]) != (bf16["tokens"], bf16["steps"]):
            raise SystemExit(f"{name} is not paired with {args.bf16}: {result['tokens']} vs {bf16['tokens']} tokens")
    print(f"{bf16['steps']} steps, {bf16['tokens']} tokens each\n")
    val = {name: validation_losses(result) for name, (_, result) in runs.items()}
    others = names[1:]
    print("| step | " + " | ".join(f"{n} val loss" for n in names) + " | " + " | ".join(f"{n} gap" for n in others) + " |")
    print("|---:|" + "---:|" * (2 * len(names) - 1))
    for step in sorted(set.intersection(*(set(v) for v in val.values()))):
        cells = [f"{val[n][step]:.4f}" for n in names] + [gap(val[n][step], val[args.bf16][step]) for n in others]
        print(f"| {step} | " + " | ".join(cells) + " |")
    print("\n| run | final val loss | gap to bf16 | final train loss | val bits/byte | train seconds | tokens/s (median) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (m, _) in runs.items():
        print(f"| {name} | {m['final_val_loss']:.4f} | {gap(m['final_val_loss'], bf16_metrics['final_val_loss'])} | "
              f"{m['final_train_loss']:.4f} | {m['final_val_bits_per_byte']:.4f} | {m['train_seconds']:.0f} | "
              f"{m['tokens_per_s_median']:.0f} |")
    final = (fp8_metrics["final_val_loss"] - bf16_metrics["final_val_loss"]) / bf16_metrics["final_val_loss"]
    verdict = "within" if abs(final) < PAPER_BOUND else "outside"
    print(f"\nfinal validation loss gap: {final * 100:+.3f}% ({verdict} the paper's 0.25%)")


if __name__ == "__main__":
    main()
