"""Task accuracy on verifiable math problems (paper §5.1-5.2: a deterministic answer "in a designated format
(e.g., in a box)", checked by rules).

A completion is correct when the content of its last \\boxed{...} equals the reference under math-verify
(so 12, 12.0 and \\frac{24}{2} all match 12); it is well formed when it has exactly one non-empty \\boxed{...}
at its end (dsv3.data.math_tasks.is_well_formed). Generation is batched with left padding and stops at the
tokenizer's EOS; any causal LM and tokenizer with a chat template work. The SFT stage reports greedy accuracy;
the RL stage compares SFT and RL checkpoints with the same function, including pass@k from sampled answers.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch
from math_verify import parse, verify

from dsv3.data.chat import conversation
from dsv3.data.math_tasks import extract_boxed, is_well_formed

VERIFY_TIMEOUT_S = 5
"""math-verify's own timeout (SIGALRM), usable only in the main thread; elsewhere answers are checked without one."""


def answer_is_correct(completion: str, reference: str) -> bool:
    """True when the last \\boxed{...} of `completion` equals `reference` mathematically (math-verify)."""
    answer = extract_boxed(completion)
    if not answer:
        return False
    timeout = VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold = parse(f"${reference}$", parsing_timeout=timeout)
    predicted = parse(f"${answer}$", parsing_timeout=timeout)
    return bool(gold and predicted and verify(gold, predicted, timeout_seconds=timeout))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 − C(n−c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def score_completions(
    completions: Sequence[Sequence[str]],
    references: Sequence[str],
    lengths: Sequence[Sequence[int]],
    k: int = 1,
    max_new_tokens: int | None = None,
) -> dict[str, float]:
    """Scores of n completions per problem: accuracy (mean over all completions), pass_at_k (mean over problems),
    format_rate (share well formed), mean_completion_tokens (generated tokens, EOS included) and, given the
    generation budget, truncated_rate (share that used all of it: cut off, or ended exactly at the limit)."""
    if len(completions) != len(references) or len(completions) != len(lengths) or not completions:
        raise ValueError(
            "need one list of completions and of lengths per reference, and at least one problem"
        )
    correct = [
        [answer_is_correct(text, ref) for text in texts]
        for texts, ref in zip(completions, references, strict=True)
    ]
    flat = [text for texts in completions for text in texts]
    scores = {
        "accuracy": sum(map(sum, correct)) / len(flat),
        "pass_at_k": sum(pass_at_k(len(c), sum(c), k) for c in correct) / len(correct),
        "format_rate": sum(map(is_well_formed, flat)) / len(flat),
        "mean_completion_tokens": sum(map(sum, lengths)) / len(flat),
    }
    if max_new_tokens is not None:
        scores["truncated_rate"] = sum(n >= max_new_tokens for ns in lengths for n in ns) / len(flat)
    return scores


@torch.no_grad()
def generate_completions(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    n: int = 1,
    temperature: float = 0.0,
) -> tuple[list[list[str]], list[list[int]]]:
    """n completions per user prompt (greedy when temperature is 0), generated from the chat template's
    assistant prompt; returns their texts (special tokens dropped) and their lengths in tokens up to the first EOS
    (included). Prompts are batched by length, left-padded."""
    if temperature == 0 and n > 1:
        raise ValueError("n > 1 completions per prompt need sampling: set temperature > 0")
    texts = [
        tokenizer.apply_chat_template(conversation(p), add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature else {}
    )
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    completions: list[list[str]] = [[] for _ in texts]
    lengths: list[list[int]] = [[] for _ in texts]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in chunk],
                padding=True,
                padding_side="left",
                add_special_tokens=False,
                return_tensors="pt",
            ).to(model.device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                num_return_sequences=n,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
            new = out[:, batch["input_ids"].shape[1] :]  # (len(chunk) · n, new tokens), prompt-major
            for row, tokens in enumerate(new.tolist()):
                i = chunk[row // n]
                eos = (
                    tokens.index(tokenizer.eos_token_id) + 1
                    if tokenizer.eos_token_id in tokens
                    else len(tokens)
                )
                completions[i].append(tokenizer.decode(tokens[:eos], skip_special_tokens=True))
                lengths[i].append(eos)
    finally:
        model.train(was_training)
    return completions, lengths


def evaluate_accuracy(
    model,
    tokenizer,
    problems: Sequence[dict],
    max_new_tokens: int,
    batch_size: int = 32,
    k: int = 1,
    temperature: float = 0.0,
    n: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """accuracy, pass_at_k, format_rate, mean_completion_tokens and truncated_rate of `model` on `problems` (dicts with "prompt"
    and "answer", as dsv3.data.math_tasks.generate_problems makes them). k = 1 and temperature 0: greedy
    accuracy (pass_at_k = accuracy). k > 1: n >= k samples per problem (n defaults to k) at `temperature` > 0,
    drawn under `seed` without touching the global RNG."""
    n = k if n is None else n
    if k < 1 or n < k:
        raise ValueError(f"pass@k needs 1 <= k <= n samples per problem, got k={k}, n={n}")
    devices = [model.device.index or 0] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        completions, lengths = generate_completions(
            model, tokenizer, [p["prompt"] for p in problems], max_new_tokens, batch_size, n, temperature
        )
    return score_completions(completions, [p["answer"] for p in problems], lengths, k, max_new_tokens)
