"""Verifiable math problems for SFT, reward modelling and RL (paper §5.1-5.2: rule-based rewards for math
with a deterministic answer "in a designated format (e.g., in a box)").

Two kinds, both with integer answers and a worked solution that ends with the answer in `\\boxed{...}`:
* "arithmetic": a multi-step word problem; `steps` operations (add, take away, multiply, share equally),
  starting amount and added/taken amounts up to `max_operand`, factors and divisors 2..5.
* "linear": a linear equation in x, |x| <= max_operand; `steps` picks the form
  1: x + b = d   2: a x + b = d   3: a(x + b) + c = d   4 (and above): a x + b = c x + d.
Difficulty is the pair (steps, max_operand).

Train and held-out splits are disjoint by construction: a hash of a problem's canonical form (its kind and
numbers, not the names in its story) puts it in "heldout" when it falls below HELDOUT_FRACTION.
"""

import random
import re

from dsv3.data.chat import conversation
from dsv3.data.corpus import hash_fraction

SPLITS = ("train", "heldout")
KINDS = ("arithmetic", "linear")
HELDOUT_FRACTION = 0.2
INSTRUCTION = "Solve the problem step by step and give the final answer as \\boxed{N}."

NAMES = ("Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena")
ITEMS = ("apples", "marbles", "stamps", "coins", "books", "shells", "cards", "pencils")


def signed(value: int) -> str:
    """'+ 7' or '- 7', to write a term after another."""
    return f"+ {value}" if value >= 0 else f"- {-value}"


def arithmetic_problem(rng: random.Random, steps: int, max_operand: int) -> tuple[tuple, str, str, int]:
    """(canonical form, question, solution, answer) of a word problem with `steps` operations."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(1, max_operand)
    story = [f"{name} has {value} {item}."]
    work = [f"{name} starts with {value} {item}."]
    canonical = ["start", value]
    for _ in range(steps):
        divisors = [k for k in range(2, 6) if value % k == 0 and value > 0]
        moves = ["add", "mul"] + (["take"] if value > 0 else []) + (["share"] if divisors else [])
        move = rng.choice(moves)
        if move == "add":
            k = rng.randint(1, max_operand)
            story.append(f"{name} gets {k} more.")
            work.append(f"After getting {k} more: {value} + {k} = {value + k}.")
            new = value + k
        elif move == "take":
            k = rng.randint(1, min(value, max_operand))
            story.append(f"{name} gives {k} away.")
            work.append(f"After giving {k} away: {value} - {k} = {value - k}.")
            new = value - k
        elif move == "mul":
            k = rng.randint(2, 5)
            story.append(f"Then the number of {item} becomes {k} times as large.")
            work.append(f"Becoming {k} times as large: {value} * {k} = {value * k}.")
            new = value * k
        else:
            k = rng.choice(divisors)
            story.append(f"{name} shares them equally among {k} friends, keeping one friend's share.")
            work.append(f"One of {k} equal shares: {value} / {k} = {value // k}.")
            new = value // k
        canonical += [move, k]
        value = new
    story.append(f"How many {item} does {name} have now?")
    work.append(f"The answer is \\boxed{{{value}}}.")
    return ("arithmetic", *canonical), " ".join(story), "\n".join(work), value


def coefficient(a: int) -> str:
    """'x', '-x' or '3x'."""
    return {1: "x", -1: "-x"}.get(a, f"{a}x")


def shift_both_sides(value: int, of_x: bool = False) -> str:
    """'Subtract 7 from both sides' for 7, 'Add 7x to both sides' for -7 with of_x."""
    amount = coefficient(abs(value)) if of_x else str(abs(value))
    return f"Subtract {amount} from both sides" if value >= 0 else f"Add {amount} to both sides"


def divisor(a: int) -> str:
    return f"({a})" if a < 0 else str(a)


def nonzero(rng: random.Random, low: int, high: int) -> int:
    return rng.choice([v for v in range(low, high + 1) if v != 0])


def linear_problem(rng: random.Random, steps: int, max_operand: int) -> tuple[tuple, str, str, int]:
    """(canonical form, question, solution, answer) of a linear equation whose solution is an integer."""
    x = rng.randint(-max_operand, max_operand)
    b = nonzero(rng, -max_operand, max_operand)
    form = min(steps, 4)
    if form == 1:
        d = x + b
        equation = f"x {signed(b)} = {d}"
        work = [f"{shift_both_sides(b)}: x = {d} {signed(-b)} = {x}."]
        canonical = ("linear", 1, b, d)
    elif form == 2:
        a = rng.choice([v for v in range(-9, 10) if v not in (-1, 0, 1)])
        d = a * x + b
        equation = f"{coefficient(a)} {signed(b)} = {d}"
        work = [
            f"{shift_both_sides(b)}: {coefficient(a)} = {d} {signed(-b)} = {d - b}.",
            f"Divide both sides by {a}: x = {d - b} / {divisor(a)} = {x}.",
        ]
        canonical = ("linear", 2, a, b, d)
    elif form == 3:
        a = rng.choice([v for v in range(-9, 10) if v not in (-1, 0, 1)])
        c = nonzero(rng, -max_operand, max_operand)
        d = a * (x + b) + c
        equation = f"{a}(x {signed(b)}) {signed(c)} = {d}"
        work = [
            f"{shift_both_sides(c)}: {a}(x {signed(b)}) = {d} {signed(-c)} = {d - c}.",
            f"Divide both sides by {a}: x {signed(b)} = {d - c} / {divisor(a)} = {x + b}.",
            f"{shift_both_sides(b)}: x = {x + b} {signed(-b)} = {x}.",
        ]
        canonical = ("linear", 3, a, b, c, d)
    else:
        a, c = rng.sample([v for v in range(-9, 10) if v != 0], 2)
        d = (a - c) * x + b
        equation = f"{coefficient(a)} {signed(b)} = {coefficient(c)} {signed(d)}"
        work = [
            f"{shift_both_sides(c, of_x=True)}: {coefficient(a - c)} {signed(b)} = {d}.",
            f"{shift_both_sides(b)}: {coefficient(a - c)} = {d} {signed(-b)} = {d - b}.",
            f"Divide both sides by {a - c}: x = {d - b} / {divisor(a - c)} = {x}.",
        ]
        canonical = ("linear", 4, a, b, c, d)
    work.append(f"The answer is \\boxed{{{x}}}.")
    return canonical, f"Solve for x: {equation}.", "\n".join(work), x


PROBLEM_MAKERS = {"arithmetic": arithmetic_problem, "linear": linear_problem}


def problem_split(canonical: tuple) -> str:
    """'heldout' or 'train', fixed by the problem's canonical form alone."""
    return "heldout" if hash_fraction(repr(canonical)) < HELDOUT_FRACTION else "train"


def generate_problems(
    n: int,
    split: str,
    seed: int,
    steps: int = 2,
    max_operand: int = 20,
    kinds: tuple[str, ...] = KINDS,
) -> list[dict]:
    """`n` distinct problems of `split` ("train" | "heldout"): dicts with prompt, solution, answer (a str of
    the integer), kind. The same arguments give the same problems."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"problem kinds {sorted(unknown) or '()'} unknown; use some of {', '.join(KINDS)}")
    if steps < 1 or max_operand < 2:
        raise ValueError(f"steps={steps} must be >= 1 and max_operand={max_operand} >= 2")
    rng = random.Random(f"math:{seed}:{split}:{steps}:{max_operand}")
    problems, seen = [], set()
    for _ in range(50 * n + 1000):
        if len(problems) == n:
            break
        kind = kinds[len(problems) % len(kinds)]
        canonical, question, solution, answer = PROBLEM_MAKERS[kind](rng, steps, max_operand)
        if canonical in seen or problem_split(canonical) != split:
            continue
        seen.add(canonical)
        problems.append(
            {
                "prompt": f"{question}\n{INSTRUCTION}",
                "solution": solution,
                "answer": str(answer),
                "kind": kind,
            }
        )
    if len(problems) < n:
        raise ValueError(
            f"found only {len(problems)} distinct {split} problems of steps={steps}, max_operand={max_operand}; "
            "ask for fewer or raise max_operand"
        )
    return problems


BOXED = "\\boxed{"


def boxed_spans(text: str) -> list[tuple[int, int]]:
    """(start of '\\boxed{', index after its matching '}') for every complete \\boxed{...} in `text`."""
    spans = []
    for match in re.finditer(re.escape(BOXED), text):
        depth = 1
        for i in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                spans.append((match.start(), i + 1))
                break
    return spans


def extract_boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{...} (nested braces allowed), or None."""
    spans = boxed_spans(text)
    if not spans:
        return None
    start, end = spans[-1]
    return text[start + len(BOXED) : end - 1].strip()


def is_well_formed(text: str) -> bool:
    """Format rule for rewards: exactly one \\boxed{...}, not empty, followed only by an optional '.' and
    whitespace."""
    spans = boxed_spans(text)
    if len(spans) != 1 or text.count(BOXED) != 1:
        return False
    start, end = spans[0]
    content = text[start + len(BOXED) : end - 1].strip()
    return bool(content) and text[end:].strip() in ("", ".")


def sft_example(problem: dict) -> dict:
    """A conversational SFT row for TRL: {"messages": [user prompt, assistant solution]}."""
    return {"messages": conversation(problem["prompt"], problem["solution"])}


def rl_example(problem: dict) -> dict:
    """A conversational GRPO row for TRL: {"prompt": [user message], "answer": ...} (answer goes to the reward)."""
    return {"prompt": conversation(problem["prompt"]), "answer": problem["answer"]}
