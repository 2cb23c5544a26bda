"""Forward+backward tokens/s: dsv3's DSV3ForCausalLM vs transformers' DeepseekV3ForCausalLM, same weights and batch.

Both models hold the same weights (ours exported with dsv3.model.hf.export_hf and loaded by transformers), run in one
process, interleaved step by step so that load from other processes hits all alike; the best (minimum) step time is
the least disturbed estimate on a shared machine, the median is printed beside it. transformers runs with its
defaults (sdpa attention, grouped_mm experts) and, as a second row, with its eager per-expert loop. Ours runs eagerly
and, as another row, with every block compiled in place (dsv3.train.compile.compile_blocks, the recipe's
`pretrain.compile: true`), on a copy of the same weights. The first step of each model is timed on its own (for the
compiled row it includes compiling the blocks, forward and backward); best and median are over the steps after the
warm-up. Ours computes the main CE only here (no MTP, D = 0) so the work is the same.

    .venv/bin/python benchmarks/train_step.py [--steps 10] [--batch 4] [--seq 256] [--dtype float32] [--no-compile]
"""

import argparse
import copy
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

from dsv3.model import DSV3Config, DSV3ForCausalLM
from dsv3.model.hf import export_hf

CONFIG = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1536,
    moe_intermediate_size=256,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    num_attention_heads=8,
    n_routed_experts=32,
    n_shared_experts=1,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    q_lora_rank=192,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    num_nextn_predict_layers=0,
    max_position_embeddings=4096,
)


def cpu_name() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def step_seconds(model, ids) -> float:
    start = time.perf_counter()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled row")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    # imported here, not at the top: the GPU check imports this file through kv_cache.py where dsv3.train's package
    # (Lightning, datasets) may be missing
    from dsv3.train.compile import compile_blocks

    torch.manual_seed(0)
    ours = DSV3ForCausalLM(DSV3Config(**CONFIG))
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(Path(tmp) / "ckpt")
        export_hf(Path(tmp) / "ckpt", Path(tmp) / "hf", with_tokenizer=False)
        models = {
            "dsv3 DSV3ForCausalLM": ours,
            **({} if args.no_compile else {"dsv3 DSV3ForCausalLM, compiled blocks": compile_blocks(copy.deepcopy(ours))}),
            "transformers DeepseekV3 (sdpa, grouped_mm)": AutoModelForCausalLM.from_pretrained(
                Path(tmp) / "hf"
            ),
            "transformers DeepseekV3 (sdpa, eager experts)": AutoModelForCausalLM.from_pretrained(
                Path(tmp) / "hf", experts_implementation="eager"
            ),
        }
    models = {name: model.to(dtype).train() for name, model in models.items()}
    ids = torch.randint(0, CONFIG["vocab_size"], (args.batch, args.seq))
    first = {name: step_seconds(model, ids) for name, model in models.items()}  # compiles the compiled row
    times = {name: [] for name in models}
    for step in range(1, max(args.warmup, 1) + args.steps):  # the first step counts as warm-up
        for name, model in models.items():
            seconds = step_seconds(model, ids)
            if step >= max(args.warmup, 1):
                times[name].append(seconds)
    tokens = args.batch * args.seq
    reference = "transformers DeepseekV3 (sdpa, grouped_mm)"
    ref_best, ref_median = min(times[reference]), statistics.median(times[reference])
    print(
        f"machine: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(f"config: {CONFIG}")
    print(
        f"batch {args.batch}×{args.seq} tokens, {args.dtype}, {args.steps} interleaved steps after {args.warmup} warm-up\n"
    )
    print("| model | first step s (compile included) | s/step best | s/step median | tokens/s (best) | "
          "speed-up vs transformers default, best / median |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, samples in times.items():
        best, median = min(samples), statistics.median(samples)
        print(
            f"| {name} | {first[name]:.2f} | {best:.3f} | {median:.3f} | {tokens / best:,.0f} | "
            f"{ref_best / best:.2f}× / {ref_median / median:.2f}× |"
        )


if __name__ == "__main__":
    main()
