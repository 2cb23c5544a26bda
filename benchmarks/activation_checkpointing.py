"""Activation checkpointing (dsv3.train.recompute) on the CPU: time per training step and peak memory for none, full
and selective (every 2nd block), a small DSV3 model in fp32, each mode in a fresh process (so that one mode's peak
does not hide another's). Peak: the process's peak resident memory (ru_maxrss) less its resident memory before the
first step, i.e. activations, gradients and the allocator's slack. Time: the median step after one warm-up.

    .venv/bin/python benchmarks/activation_checkpointing.py [--steps 3] [--batch 4] [--seq 512] [--layers 6]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from train_step import cpu_name

from dsv3.model import DSV3Config, DSV3ForCausalLM
from dsv3.train.recompute import checkpoint_blocks

MODES = ("none", "full", "selective")


def config(layers: int, seq: int) -> DSV3Config:
    return DSV3Config(
        vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=layers,
        first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
        n_shared_experts=1, num_nextn_predict_layers=1, max_position_embeddings=seq,
    )  # fmt: skip


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(mode: str, steps: int, batch: int, seq: int, layers: int) -> dict:
    """One mode in this process: median step seconds and peak memory growth (bytes)."""
    torch.manual_seed(0)
    model = DSV3ForCausalLM(config(layers, seq)).train()
    checkpoint_blocks(model, mode, every=2)
    ids = torch.randint(0, 4096, (batch, seq))
    before = resident_bytes()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        out = model(input_ids=ids, labels=ids, use_cache=False)
        (out.loss + 0.3 * out.mtp_losses.mean()).backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # ru_maxrss: KiB on Linux
    return {"mode": mode, "seconds": statistics.median(times[1:]), "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # the child process's one mode
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.steps, args.batch, args.seq, args.layers)))
        return
    sizes = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq), "--layers", str(args.layers)]
    rows = [
        json.loads(subprocess.run([sys.executable, __file__, "--mode", m, *sizes], capture_output=True, text=True, check=True).stdout)
        for m in MODES
    ]
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; {args.layers} blocks + 1 MTP, "
          f"hidden 256, batch {args.batch} × {args.seq} tokens, fp32; selective = every 2nd block")  # fmt: skip
    print("\n| activation_checkpointing | step s | vs none | peak MiB | vs none |\n|---|---:|---:|---:|---:|")
    base = rows[0]
    for r in rows:
        print(f"| {r['mode']} | {r['seconds']:.2f} | {r['seconds'] / base['seconds']:.2f}x | {r['peak'] / 2**20:.0f} | "
              f"{r['peak'] / base['peak']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
