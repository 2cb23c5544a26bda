"""Datasets and scoring of dsv3's lm-evaluation-harness tasks (the YAML files in lm_eval_tasks/), built at run time
from the recipe: nothing is downloaded. lm-eval calls each builder with the TaskManager's metadata
(dsv3.eval.harness.task_metadata): the recipe's data section and its problems' difficulty and seed.

    dsv3_math      held-out math problems in the SFT chat format, greedy generation, exact match of \\boxed{N}
    dsv3_bpb       bits per byte of the recipe corpus's validation split (loglikelihood_rolling)
    dsv3_arith_mc  the same held-out problems with 4 integer choices (loglikelihood of each answer)
"""

from __future__ import annotations

import random

import datasets

from dsv3.data.chat import conversation, format_conversation
from dsv3.data.math_tasks import INSTRUCTION, extract_boxed, generate_problems

CHOICES = 4


def heldout_problems(problems: dict) -> list[dict]:
    """The recipe's held-out problems (the SFT section's count, difficulty and kinds, the recipe seed)."""
    return generate_problems(
        problems["n"], "heldout", problems["seed"], problems["steps"], problems["max_operand"], tuple(problems["kinds"])
    )


def math_heldout(problems: dict, **_) -> datasets.DatasetDict:
    """Rows {prompt: the chat-formatted user turn + assistant marker, answer}."""
    rows = [
        {"prompt": format_conversation(conversation(p["prompt"]), add_generation_prompt=True), "answer": p["answer"]}
        for p in heldout_problems(problems)
    ]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def boxed_exact_match(doc: dict, results: list[str]) -> dict:
    """1.0 when the last \\boxed{...} of the generation equals the answer."""
    return {"exact_match": float(extract_boxed(results[0]) == doc["answer"])}


def arithmetic_choices(problems: dict, **_) -> datasets.DatasetDict:
    """Rows {question, choices: 4 integers as text, label: index of the right one}; the wrong ones lie within
    ±max_operand of the answer, so only the arithmetic tells them apart."""
    rows = []
    spread = problems["max_operand"]
    for i, p in enumerate(heldout_problems(problems)):
        rng = random.Random(f"choices:{problems['seed']}:{i}")
        answer = int(p["answer"])
        wrong = rng.sample([v for v in range(answer - spread, answer + spread + 1) if v != answer], CHOICES - 1)
        choices = [answer, *wrong]
        rng.shuffle(choices)
        question = p["prompt"].removesuffix(f"\n{INSTRUCTION}")
        rows.append({"question": question, "choices": [str(c) for c in choices], "label": choices.index(answer)})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def corpus_validation(data: dict, **_) -> datasets.DatasetDict:
    """The validation documents of the recipe's corpus, as the pretraining stage splits them."""
    from dsv3.config import DataSection
    from dsv3.data.corpus import recipe_corpus

    validation = recipe_corpus(DataSection.model_validate(data))["validation"]
    return datasets.DatasetDict({"test": validation.select_columns(["text"])})
