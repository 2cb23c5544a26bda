"""How many tokens the tiny model needs before it copies from its context (README, Probes, "Limits of scale").

The tiny recipe's model (recipes/tiny.yaml, with a finished run's tokenizer) trained from scratch on copy data alone
— the recipe's loss (CE + λ·MTP + balance loss), AdamW with its groups, loss-free bias updates, LR warm-up over 40
steps then constant — and measured every `--every` steps: the induction gain (dsv3.eval.induction: first-copy minus
second-copy loss on 16 repeated random 64-token sequences) over the whole vocabulary and over the data's 500 most
frequent tokens. Kinds of data:

    copy   the mixture's copy documents (dsv3.data.generated: the corpus' words and numbers in `a x b x` episodes)
    xx     rows of `x x` episodes of random ordinary tokens, |x| uniform in [--lo, --hi]; --pool N draws them from the
           first N token ids only (bytes and the first merges)

    export OMP_NUM_THREADS=1
    .venv/bin/dsv3 run --recipe recipes/tiny.yaml --until tokenizer
    .venv/bin/python benchmarks/induction_budget.py --data copy --steps 1500 --lr 3e-3
    .venv/bin/python benchmarks/induction_budget.py --data xx --steps 800 --batch 32 --seq-len 128 --lo 24 --hi 64

It prints one row per measurement and a markdown table at the end (steps, tokens, both gains, training loss).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import datasets
import torch
from tokenizers import Tokenizer

from dsv3.config import load_recipe
from dsv3.data.corpus import recipe_corpus
from dsv3.data.dataset import build_lm_dataset
from dsv3.data.generated import corpus_words, generated_documents
from dsv3.eval.induction import copy_losses, copy_probe_rows, ordinary_token_ids, repeated_random_rows
from dsv3.model import DSV3ForCausalLM
from dsv3.stages.pretrain import model_config
from dsv3.train.balancing import update_router_biases
from dsv3.train.module import parameter_groups

WARMUP_STEPS = 40


def copy_rows(recipe, tokenizer: Tokenizer, rows: int, seq_len: int, cache: Path) -> torch.Tensor:
    """`rows` packed rows of the mixture's copy documents."""
    words = corpus_words(recipe_corpus(recipe.data)["train"]["text"])
    sample = generated_documents("copy", 64, recipe.seed, words)
    per_doc = sum(len(e.ids) + 1 for e in tokenizer.encode_batch(sample)) / len(sample)
    documents = generated_documents("copy", int(1.2 * rows * seq_len / per_doc) + 1, recipe.seed, words)
    packed = build_lm_dataset(datasets.Dataset.from_dict({"text": documents}), tokenizer, seq_len, 0.0, 0.0, recipe.seed, cache)
    return torch.tensor(packed["input_ids"][:rows])


def xx_rows(pool: list[int], rows: int, seq_len: int, lo: int, hi: int, seed: int) -> torch.Tensor:
    """`rows` rows of `x x` episodes, x a random sequence of `pool` tokens of length lo..hi."""
    rng, out = random.Random(seed), []
    for _ in range(rows):
        row: list[int] = []
        while len(row) < seq_len:
            x = [rng.choice(pool) for _ in range(rng.randint(lo, hi))]
            row += x + x
        out.append(row[:seq_len])
    return torch.tensor(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("copy", "xx"), default="copy")
    parser.add_argument("--tokenizer", type=Path, default=Path("runs/tiny/latest/tokenizer/tokenizer/tokenizer.json"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--lo", type=int, default=32)
    parser.add_argument("--hi", type=int, default=96)
    parser.add_argument("--pool", type=int, default=0, help="xx: draw from the first N token ids (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a tiny.yaml override (model.*)")
    args = parser.parse_args()
    if not args.tokenizer.is_file():
        raise SystemExit(f"{args.tokenizer} does not exist: run `dsv3 run --recipe recipes/tiny.yaml --until tokenizer`")

    torch.manual_seed(args.seed)
    recipe = load_recipe("recipes/tiny.yaml", args.set)
    tokenizer = Tokenizer.from_file(str(args.tokenizer))
    rows = args.steps * args.batch
    if args.data == "copy":
        ids = copy_rows(recipe, tokenizer, rows, args.seq_len, Path("runs/cache"))
    else:
        pool = ordinary_token_ids(tokenizer)
        ids = xx_rows(pool[: args.pool] if args.pool else pool, rows, args.seq_len, args.lo, args.hi, args.seed)

    config = model_config(recipe, tokenizer)
    model = DSV3ForCausalLM(config)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=args.lr, betas=(0.9, 0.95))
    whole = copy_probe_rows(tokenizer, recipe.seed)
    frequent = torch.bincount(ids.flatten(), minlength=config.vocab_size).argsort(descending=True)[:500].tolist()
    ordinary = set(ordinary_token_ids(tokenizer))
    frequent_rows = repeated_random_rows([t for t in frequent if t in ordinary], 16, 64, recipe.seed)

    table, losses, start = [], [], time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.every == 0:
            row = {
                "step": step,
                "tokens": step * args.batch * args.seq_len,
                "gain (whole vocabulary)": copy_losses(model, whole)["induction_gain"],
                "gain (500 most frequent)": copy_losses(model, frequent_rows)["induction_gain"],
                "training loss": sum(losses) / len(losses) if losses else float("nan"),
                "seconds": time.perf_counter() - start,
            }
            table.append(row)
            losses = []
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        if step == args.steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / WARMUP_STEPS)
        batch = ids[step * args.batch : (step + 1) * args.batch]
        out = model(input_ids=batch, labels=batch, use_cache=False)
        mtp = out.mtp_losses.mean() if out.mtp_losses is not None else 0.0
        (out.loss + recipe.pretrain.mtp_lambda * mtp + out.balance_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        load = torch.stack([gate.expert_load for gate in model.moe_gates()])
        update_router_biases(model.moe_gates(), load, recipe.pretrain.bias_update_speed)
        losses.append(out.loss.item())

    print(f"\n{args.data} data, batch {args.batch} × {args.seq_len}, LR {args.lr} {' '.join(args.set)}\n")
    print("| " + " | ".join(table[0]) + " |")
    print("|" + "---:|" * len(table[0]))
    for row in table:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
