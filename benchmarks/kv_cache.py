"""KV-cache bytes per token per layer at the 671B attention sizes: dsv3 (MLA latent + RoPE key) vs transformers.

Both models get the DeepSeek-V3 attention exactly (hidden 7168, 128 heads, q_lora 1536, kv_lora 512, nope 128 /
rope 64 / v 128) but only `--layers` blocks, a tiny vocabulary and a few small experts, so they fit in memory. Each
prefills the same `--tokens` prompt with use_cache=True; the bytes are read from the tensors the returned
DynamicCache holds (tensor nbytes and the storage actually allocated behind them).
Theory (docs/paper.md, "KV cache"): 576 values per token per layer vs 128·(192+128) = 40,960, 71.1×.

transformers 5.x's DeepseekV3Attention also caches the compressed latent (576 values), but at every decode step it
re-expands the whole cache into per-head keys and values (`expand_kv`, 40,960 values per cached token and layer)
before attending. The second measured column is that working set: the bytes of the expanded key/value tensors
materialised by one decode step after the prefill, recorded from the tensors themselves (dsv3's absorbed path
materialises none; its expanded training path, `keys_and_values`, the same as transformers).

    .venv/bin/python benchmarks/kv_cache.py [--tokens 256] [--layers 2] [--dtype bfloat16]
"""

import argparse

import torch
import transformers
from train_step import cpu_name
from transformers import DeepseekV3ForCausalLM

from dsv3.infer.absorbed import absorb_attention, cache_bytes, mla_cache_bytes_per_token
from dsv3.model import DSV3Config, DSV3ForCausalLM
from dsv3.model.hf import to_deepseek_v3_config
from dsv3.model.model import CACHE_FIELD

ATTENTION_671B = dict(
    hidden_size=7168,
    num_attention_heads=128,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
)
SMALL_REST = dict(
    vocab_size=256,
    intermediate_size=256,
    moe_intermediate_size=64,
    first_k_dense_replace=1,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    num_nextn_predict_layers=0,
    max_position_embeddings=8192,
)


def config_671b_attention(layers: int) -> DSV3Config:
    return DSV3Config(**ATTENTION_671B, **SMALL_REST, num_hidden_layers=layers)


def storage_bytes(cache) -> int:
    """Bytes allocated behind the cache's tensors (each storage counted once)."""
    storages = {}
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def record_outputs(module, method: str, sink: list) -> None:
    """Wrap module.<method> so that the bytes of the tensors it returns are appended to sink."""
    inner = getattr(module, method)

    def recorded(*args, **kwargs):
        out = inner(*args, **kwargs)
        sink.append(sum(t.nbytes for t in out))
        return out

    setattr(module, method, recorded)


@torch.no_grad()
def prefill_and_step(model, ids, method: str) -> tuple[object, int]:
    """Prefill ids, then decode one token; the cache and the bytes `method` materialised during that step."""
    cache = model(ids, use_cache=True)[CACHE_FIELD]
    sink = []
    for module in model.modules():
        if hasattr(module, method) and hasattr(module, "kv_b_proj"):
            record_outputs(module, method, sink)
    model(ids[:, -1:], use_cache=True, **{CACHE_FIELD: cache})
    return cache, sum(sink)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    config = config_671b_attention(args.layers)
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, args.tokens))
    ours = DSV3ForCausalLM(config).to(dtype).eval()
    _, expanded_step = prefill_and_step(absorb_attention(ours, enabled=False), ids, "keys_and_values")
    our_cache, absorbed_step = prefill_and_step(absorb_attention(ours), ids, "keys_and_values")
    del ours
    theirs = DeepseekV3ForCausalLM(to_deepseek_v3_config(config)).to(dtype).eval()
    their_cache, their_step = prefill_and_step(theirs, ids, "expand_kv")
    del theirs
    size = torch.empty((), dtype=dtype).element_size()
    per = (args.tokens + 1) * args.layers  # cached tokens × layers after the prefill and one decode step
    rows = [
        ("dsv3, absorbed decoding (default)", our_cache, absorbed_step),
        ("dsv3, expanded path (training)", our_cache, expanded_step),
        ("transformers DeepseekV3", their_cache, their_step),
    ]
    print(
        f"machine: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(
        f"671B attention dims, {args.layers} layers, {args.tokens} prefilled tokens + 1 decode step, {args.dtype} ({size} B/value)\n"
    )
    print(
        "| model | cache allocated (MiB) | cache bytes / token / layer | cache values / token / layer | "
        "expanded K/V per decode step (MiB) | expanded values / cached token / layer |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, cache, step_bytes in rows:
        print(
            f"| {name} | {storage_bytes(cache) / 2**20:.2f} | {cache_bytes(cache) / per:,.0f} | "
            f"{cache_bytes(cache) / per / size:,.0f} | {step_bytes / 2**20:.1f} | {step_bytes / per / size:,.0f} |"
        )
    assert cache_bytes(our_cache) == per * mla_cache_bytes_per_token(config, dtype)
    print(
        f"\ncache: transformers / dsv3 = {cache_bytes(their_cache) / cache_bytes(our_cache):.1f}x; "
        f"values touched per cached token per step: expanded / absorbed = "
        f"{their_step / per / size / 576:.1f}x (theory {40960 / 576:.1f}x)"
    )


if __name__ == "__main__":
    main()
