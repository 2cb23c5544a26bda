"""Generated pretraining documents that teach what the later stages need (data/README.md, "The mixture").

A tiny model on a few million tokens of code never learns to copy from its context (induction heads form only on
~10^7+ tokens of natural text), and every stage after pretraining needs that: passkey retrieval is copying a key,
SFT's answers copy the question's numbers, MTP drafts are cheap exactly where text repeats. DeepSeek-V3 raises the
share of math and code in its corpus for the same reason (report §4.1). Three sources, all text (the tokenizer
trains on them too), all from a seed:

* "copy": the corpus' own words and numbers in copy episodes `a x b x` — a random span x written twice with random
  gaps (Olsson et al. 2022): only looking back at a token's earlier occurrence and copying what followed predicts
  the second x;
* "retrieval": key–value records (a Python dict, or sentences "The code of K is V.") among filler, then lookups of
  some keys at the end (values: numbers of 3, 4 or 6 digits, or words); and, one document in four, the passkey
  task's own needle and question (dsv3.data.passkeys) with a "train" key — the evaluation's keys are the other half;
* "math": worked arithmetic word problems and linear equations, as prose ("So the answer is N.") and as Python
  with comments — never in the chat template and never with \\boxed{}, so SFT still has the format to teach. Only
  "train" problems (dsv3.data.math_tasks.problem_split) are written: no held-out problem is ever seen.

`corpus_words` picks the word list from the corpus, so the generated text is made of the tokenizer's own tokens.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Iterable

from dsv3.data.math_tasks import ITEMS, arithmetic_problem, linear_problem, problem_split
from dsv3.data.passkeys import NEEDLE, QUESTION, draw_key

WORD = re.compile(r"\b[A-Za-z][a-z]{2,11}\b")
RETRIEVAL_VALUE_DIGITS = (3, 4, 6)  # 5-digit numbers only as passkeys, from the "train" half of the key space


def corpus_words(texts: Iterable[str], count: int = 2000, min_count: int = 3) -> list[str]:
    """The `count` most frequent words (3-12 letters, lower case after the first) of `texts` seen at least
    `min_count` times, most frequent first (ties alphabetical): the vocabulary the generated documents use."""
    counts = Counter(word for text in texts for word in WORD.findall(text))
    ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    if len(ranked) < 50:
        raise ValueError(
            f"data.mixture: the corpus has {len(ranked)} words seen {min_count}+ times and the generated sources need "
            ">= 50; give the corpus more text or set data.mixture: null"
        )
    return ranked[:count]


def number(rng: random.Random, digits: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(digits))


def token_like(rng: random.Random, words: list[str]) -> str:
    """A word of the corpus, or (one time in ten) a number of 1-5 digits (digits are single tokens: more would make
    most of a copy span digits, each seen many times in a row, which gives a look-back nothing unique to match)."""
    return number(rng, rng.randint(1, 5)) if rng.random() < 0.1 else rng.choice(words)


def joined(rng: random.Random, items: list[str]) -> str:
    """Items joined by spaces, with an occasional comma or line break."""
    out = []
    for item in items:
        out.append(item)
        out.append(rng.choices((" ", ", ", "\n"), weights=(8, 1, 1))[0])
    return "".join(out[:-1])


def copy_document(rng: random.Random, words: list[str], min_items: int = 80, max_items: int = 160, span: tuple[int, int] = (6, 40)) -> str:
    """Copy episodes `a x b x` until min_items..max_items words and numbers: each a span x of span[0]..span[1]
    random items written twice, the same text both times, after a gap a of 0..8 items and with a gap b of 0..16
    between the copies. Short look-back distances (~10-100 tokens) keep most copies within one packed row."""
    target, count, pieces = rng.randint(min_items, max_items), 0, []
    while count < target:
        x = [token_like(rng, words) for _ in range(rng.randint(*span))]
        a = [token_like(rng, words) for _ in range(rng.randint(0, 8))]
        b = [token_like(rng, words) for _ in range(rng.randint(0, 16))]
        text = joined(rng, x)
        pieces += [joined(rng, a), text, joined(rng, b), text]
        count += len(a) + len(b) + 2 * len(x)
    return joined(rng, [p for p in pieces if p])


def retrieval_value(rng: random.Random, words: list[str]) -> str:
    return number(rng, rng.choice(RETRIEVAL_VALUE_DIGITS)) if rng.random() < 0.7 else rng.choice(words)


def filler(rng: random.Random, words: list[str], low: int, high: int) -> str:
    return joined(rng, [rng.choice(words) for _ in range(rng.randint(low, high))])


def passkey_document(rng: random.Random, words: list[str], digits: int = 5) -> str:
    """The passkey task's own needle and question (dsv3.data.passkeys) around filler, with a "train" key: the
    evaluation's held-out keys never occur."""
    key = draw_key(rng, digits, "train")
    return filler(rng, words, 5, 60) + NEEDLE.format(key=key) + filler(rng, words, 5, 80) + QUESTION + key + ".\n"


def retrieval_document(rng: random.Random, words: list[str], pairs: tuple[int, int] = (3, 6), gap: tuple[int, int] = (10, 60)) -> str:
    """Key–value records among filler, then lookups of some of them (each key once, values as stored): as a
    Python dict with asserts, as sentences with questions, or (one time in four) as a passkey document."""
    if rng.random() < 0.25:
        return passkey_document(rng, words)
    n = rng.randint(*pairs)
    keys: list[str] = []
    while len(keys) < n:
        key = f"{rng.choice(words)}_{rng.choice(words)}".lower()
        if key not in keys:
            keys.append(key)
    values = [retrieval_value(rng, words) for _ in keys]
    asked = rng.sample(range(n), rng.randint(1, min(3, n)))
    before, after = filler(rng, words, 0, gap[1] // 3), filler(rng, words, *gap)
    if rng.random() < 0.5:
        name = rng.choice(words).lower()
        quoted = [v if v.isdigit() else repr(v) for v in values]
        records = "\n".join(f"    {k!r}: {v}," for k, v in zip(keys, quoted, strict=True))
        lookups = "\n".join(f"assert {name}[{keys[i]!r}] == {quoted[i]}" for i in asked)
        return f"# {before}\n{name} = {{\n{records}\n}}\n# {after}\n{lookups}\n"
    records = " ".join(f"The code of {k} is {v}." for k, v in zip(keys, values, strict=True))
    lookups = " ".join(f"What is the code of {keys[i]}? The code of {keys[i]} is {values[i]}." for i in asked)
    return f"{before}\n{records}\n{after}\n{lookups}\n"


def train_problem(rng: random.Random, kind: str, steps: int, max_operand: int) -> tuple[tuple, str, str, int]:
    """A problem of the "train" split (dsv3.data.math_tasks): drawn again until its canonical form is not held out."""
    maker = arithmetic_problem if kind == "arithmetic" else linear_problem
    while True:
        problem = maker(rng, steps, max_operand)
        if problem_split(problem[0]) == "train":
            return problem


def worked_lines(solution: str) -> list[str]:
    """The solution's working without its final `The answer is \\boxed{N}.` line."""
    return [line for line in solution.splitlines() if "\\boxed{" not in line]


def math_as_prose(question: str, solution: str, answer: int) -> str:
    return f"{question}\n" + "\n".join(worked_lines(solution)) + f"\nSo the answer is {answer}.\n"


def math_as_code(canonical: tuple, question: str, solution: str, answer: int) -> str:
    """Python: the question and working as comments; for word problems the operations as statements."""
    lines = [f"# {question}"]
    if canonical[0] == "arithmetic":
        item = next((i for i in ITEMS if f" {i}" in question), "total")
        value = canonical[2]
        lines.append(f"{item} = {value}")
        ops = {"add": "+", "take": "-", "mul": "*", "share": "//"}
        for move, k in zip(canonical[3::2], canonical[4::2], strict=True):
            new = {"add": value + k, "take": value - k, "mul": value * k, "share": value // max(k, 1)}[move]
            lines.append(f"{item} = {item} {ops[move]} {k}  # {value} {ops[move]} {k} = {new}")
            value = new
        lines.append(f"print({item})  # {answer}")
    else:
        lines += [f"# {line}" for line in worked_lines(solution)]
        lines.append(f"x = {answer}")
    return "\n".join(lines) + "\n"


def math_document(rng: random.Random, problems: tuple[int, int] = (2, 5), max_steps: int = 3, max_operands: tuple[int, ...] = (10, 20)) -> str:
    """A few worked "train" problems of random kind and difficulty (1..max_steps operations, operands up to one of
    max_operands), each as prose or as code."""
    docs = []
    for _ in range(rng.randint(*problems)):
        kind = rng.choice(("arithmetic", "linear"))
        canonical, question, solution, answer = train_problem(rng, kind, rng.randint(1, max_steps), rng.choice(max_operands))
        if rng.random() < 0.5:
            docs.append(math_as_prose(question, solution, answer))
        else:
            docs.append(math_as_code(canonical, question, solution, answer))
    return "\n".join(docs)


GENERATED_SOURCES: dict[str, Callable[..., str]] = {
    "copy": copy_document,
    "retrieval": retrieval_document,
    "math": math_document,
}
"""The generated sources of a mixture by name, each (rng, words) -> one document ("math" takes no words)."""


def generated_document(source: str, seed: int, index: int, words: list[str]) -> str:
    """Document `index` of `source`: it depends only on (source, seed, index), so a longer list extends a shorter."""
    if source not in GENERATED_SOURCES:
        raise ValueError(f"unknown generated source {source!r}; use one of {', '.join(GENERATED_SOURCES)}")
    rng = random.Random(f"{source}:{seed}:{index}")
    return math_document(rng) if source == "math" else GENERATED_SOURCES[source](rng, words)


def generated_documents(source: str, count: int, seed: int, words: list[str]) -> list[str]:
    """The first `count` documents of `source`."""
    return [generated_document(source, seed, i, words) for i in range(count)]
