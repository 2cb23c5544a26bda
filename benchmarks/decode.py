"""Decode tokens/s at 1K and 4K context: dsv3 (absorbed MLA) vs transformers' DeepseekV3ForCausalLM, same weights.

The model has DeepSeek-V3's attention exactly (hidden 7168, 128 heads, q_lora 1536, kv_lora 512, nope 128 / rope 64 /
v 128; benchmarks/kv_cache.py) with `--layers` blocks, a tiny vocabulary and small experts, so attention is what is
measured. transformers loads our weights from `export_hf`. Both caches hold the same (normed latent, rotated RoPE
key) per token (checked on a short prompt), so each context is prefilled once by dsv3 (in chunks of 512 tokens)
and every model decodes from its own copy of that cache, one token per step (batch 1), interleaved step by step;
the best step is the least disturbed figure on a shared machine, the median is printed beside it. Rows: dsv3 absorbed (the default for
generation), dsv3's expanded training path, transformers (which re-expands the whole cache every step).

    .venv/bin/python benchmarks/decode.py [--contexts 1024 4096] [--steps 6] [--layers 2] [--dtype float32]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from kv_cache import config_671b_attention
from train_step import cpu_name
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

from dsv3.infer.absorbed import absorb_attention
from dsv3.model import DSV3ForCausalLM
from dsv3.model.hf import export_hf
from dsv3.model.model import CACHE_FIELD


def clone_cache(cache: DynamicCache) -> DynamicCache:
    copied = DynamicCache()
    for idx, layer in enumerate(cache.layers):
        copied.update(layer.keys.clone(), layer.values.clone(), idx)
    return copied


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    config = config_671b_attention(args.layers)
    config.max_position_embeddings = max(args.contexts) + args.steps + 8
    torch.manual_seed(0)
    expanded = DSV3ForCausalLM(config).to(dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        expanded.save_pretrained(Path(tmp) / "ckpt")
        export_hf(Path(tmp) / "ckpt", Path(tmp) / "hf", with_tokenizer=False)
        theirs = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=dtype).eval()
    absorbed = expanded  # one dsv3 model, switched between the two attention paths before each step
    models = {
        "dsv3 absorbed (default)": True,
        "dsv3 expanded (training path)": False,
        "transformers DeepseekV3": theirs,
    }

    absorb_attention(absorbed)
    probe = torch.randint(0, config.vocab_size, (1, 16))
    ours_cache, their_cache = (
        absorbed(probe, use_cache=True)[CACHE_FIELD],
        theirs(probe, use_cache=True)[CACHE_FIELD],
    )
    for a, b in zip(ours_cache.layers, their_cache.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(a.values, b.values, atol=2e-2, rtol=2e-2)

    print(
        f"machine: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(
        f"671B attention dims, {args.layers} layers, batch 1, {args.dtype}, {args.steps} decode steps per context\n"
    )
    print(
        "| context | model | ms/step best | ms/step median | tokens/s (best) | dsv3 absorbed speed-up best / median |"
    )
    print("|---:|---|---:|---:|---:|---:|")
    for context in args.contexts:
        prompt = torch.randint(0, config.vocab_size, (1, context))
        cache = DynamicCache(config=config)
        for chunk in prompt.split(args.prefill_chunk, dim=1):  # chunked prefill: no (H, S, S) score matrix
            out = absorb_attention(absorbed)(chunk, use_cache=True, **{CACHE_FIELD: cache})
        caches = {name: clone_cache(cache) for name in models}
        tokens = {name: out.logits[:, -1:].argmax(-1) for name in models}
        times = {name: [] for name in models}
        for step in range(args.steps + 1):  # step 0 warms up
            for name, model in models.items():
                if isinstance(model, bool):
                    model = absorb_attention(expanded, enabled=model)
                start = time.perf_counter()
                logits = model(tokens[name], use_cache=True, **{CACHE_FIELD: caches[name]}).logits
                if step:
                    times[name].append(time.perf_counter() - start)
                tokens[name] = logits[:, -1:].argmax(-1)
        ref_best, ref_median = (
            min(times["dsv3 absorbed (default)"]),
            statistics.median(times["dsv3 absorbed (default)"]),
        )
        for name in models:
            best, median = min(times[name]), statistics.median(times[name])
            print(
                f"| {context} | {name} | {best * 1e3:.1f} | {median * 1e3:.1f} | {1 / best:.2f} | "
                f"{best / ref_best:.2f}x / {median / ref_median:.2f}x |",
                flush=True,
            )
        del caches, out


if __name__ == "__main__":
    main()
