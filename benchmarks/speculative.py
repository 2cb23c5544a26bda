"""MTP speculative decoding vs plain greedy decoding on a trained checkpoint: acceptance rate and tokens/s.

Both decoders run the same model (absorbed MLA) on the same prompts in one process, interleaved prompt by prompt,
each prompt `--repeats` times (the best time per prompt counts: the least disturbed on a shared machine). Prompts are
the openings of Python standard-library modules (what recipes/tiny.yaml trains on), fed after EOS as
`dsv3 generate` does; decoding stops at --max-new-tokens (EOS is ignored so every row yields the same token count).
The speculative output is checked equal to greedy token for token.

    .venv/bin/python benchmarks/speculative.py runs/tiny/pretrain/model [--prompts 8] [--max-new-tokens 64]
"""

import argparse
import inspect
import json
import statistics

import torch
from train_step import cpu_name
from transformers.utils.logging import disable_progress_bar

from dsv3.infer.generate import load_checkpoint, prompt_ids
from dsv3.infer.speculative import greedy_decode, mtp_speculative_decode

MODULES = (
    "json",
    "csv",
    "argparse",
    "textwrap",
    "fractions",
    "heapq",
    "bisect",
    "shlex",
    "glob",
    "fnmatch",
    "calendar",
    "string",
)


def prompts(n: int, prompt_chars: int) -> list[str]:
    texts = []
    for name in MODULES[:n]:
        source = inspect.getsource(__import__(name))
        start = source.find("\ndef ")  # the opening of the first function: code, not the module docstring
        texts.append(source[start + 1 : start + 1 + prompt_chars])
    return texts


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "ckpt", help="checkpoint directory (save_pretrained + tokenizer), e.g. runs/tiny/pretrain/model"
    )
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-chars", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: tiny models decode fastest so)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    disable_progress_bar()
    model, tokenizer = load_checkpoint(args.ckpt)
    n_params = sum(p.numel() for p in model.parameters())
    greedy_s, spec_s, drafted, accepted, new_tokens, forwards = [], [], 0, 0, 0, 0
    for text in prompts(args.prompts, args.prompt_chars):
        ids = prompt_ids(tokenizer, text)
        plain_runs = []
        spec_runs = []
        for _ in range(args.repeats):
            plain_runs.append(greedy_decode(model, ids, args.max_new_tokens))
            spec_runs.append(mtp_speculative_decode(model, ids, args.max_new_tokens))
        if spec_runs[0].sequences.tolist() != plain_runs[0].sequences.tolist():
            raise SystemExit(f"speculative output differs from greedy on prompt {text[:30]!r}")
        greedy_s.append(min(r.seconds for r in plain_runs))
        spec_s.append(min(r.seconds for r in spec_runs))
        drafted, accepted = drafted + spec_runs[0].drafted, accepted + spec_runs[0].accepted
        new_tokens += spec_runs[0].new_tokens
        forwards += spec_runs[0].main_forwards
    rate = accepted / drafted
    greedy_tps, spec_tps = new_tokens / sum(greedy_s), new_tokens / sum(spec_s)
    print(f"machine: {cpu_name()}, {args.threads} thread(s); torch {torch.__version__}")
    print(
        f"checkpoint {args.ckpt}: {n_params / 1e6:.2f}M parameters, "
        f"{json.dumps({k: getattr(model.config, k) for k in ('hidden_size', 'num_hidden_layers', 'num_nextn_predict_layers')})}"
    )
    print(
        f"{args.prompts} prompts × {args.max_new_tokens} new tokens, best of {args.repeats}; "
        f"outputs identical token for token\n"
    )
    print(
        "| decoding | tokens | main-model forwards | acceptance (accepted / drafted) | tokens per forward | tokens/s | speed-up |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| greedy | {new_tokens} | {new_tokens} | - | 1.00 | {greedy_tps:.1f} | 1.00x |")
    print(
        f"| MTP speculative (greedy acceptance) | {new_tokens} | {forwards} | {rate:.1%} ({accepted}/{drafted}) | "
        f"{new_tokens / forwards:.2f} | {spec_tps:.1f} | {spec_tps / greedy_tps:.2f}x |"
    )
    per_prompt = [g / s for g, s in zip(greedy_s, spec_s, strict=True)]
    print(
        f"\nper-prompt speed-up: median {statistics.median(per_prompt):.2f}x, min {min(per_prompt):.2f}x, max {max(per_prompt):.2f}x"
    )


if __name__ == "__main__":
    main()
