import re

import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3.data.math_tasks import (
    extract_boxed,
    generate_problems,
    is_well_formed,
    problem_split,
    rl_example,
    sft_example,
)


def solve_equation(prompt: str) -> int:
    """Solve 'Solve for x: <equation>.' independently with sympy."""
    equation = re.search(r"Solve for x: (.*)\.\n", prompt).group(1)
    implicit = re.sub(r"(\d)([x(])", r"\1*\2", equation).replace("-x", "-1*x")
    lhs, rhs = implicit.split("=")
    (solution,) = sympy.solve(sympy.Eq(sympy.sympify(lhs), sympy.sympify(rhs)), sympy.Symbol("x"))
    return int(solution)


def check_arithmetic(solution: str) -> int:
    """Recompute every step of a word-problem solution; each step starts from the previous result."""
    value = int(re.search(r"starts with (\d+)", solution).group(1))
    for a, op, b, result in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", solution):
        assert int(a) == value
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": int(a) // int(b)}[op]
        assert value == int(result) and (op != "/" or int(a) % int(b) == 0)
    return value


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 6])
def test_answers_are_correct_and_solutions_well_formed(steps):
    for problem in generate_problems(60, "train", seed=0, steps=steps, max_operand=30):
        answer = int(problem["answer"])
        assert extract_boxed(problem["solution"]) == problem["answer"]
        assert is_well_formed(problem["solution"])
        if problem["kind"] == "linear":
            assert solve_equation(problem["prompt"]) == answer
        else:
            assert check_arithmetic(problem["solution"]) == answer
            assert problem["solution"].count("\n") == steps + 1


@pytest.mark.parametrize("steps,max_operand", [(1, 30), (2, 20), (4, 50)])
def test_train_and_heldout_are_disjoint(steps, max_operand):
    train = generate_problems(1000, "train", seed=1, steps=steps, max_operand=max_operand)
    heldout = generate_problems(200, "heldout", seed=2, steps=steps, max_operand=max_operand)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in heldout}
    assert len({p["prompt"] for p in train}) == 1000  # distinct within a split


def test_split_is_decided_by_the_math_not_the_story():
    assert problem_split(("arithmetic", "start", 5, "add", 3)) == problem_split(
        ("arithmetic", "start", 5, "add", 3)
    )
    splits = [problem_split(("linear", 1, b, d)) for b in range(1, 40) for d in range(40)]
    assert 0.15 < splits.count("heldout") / len(splits) < 0.25


def test_deterministic_and_difficulty_changes_the_problems():
    assert generate_problems(20, "heldout", seed=5) == generate_problems(20, "heldout", seed=5)
    assert generate_problems(20, "heldout", seed=5) != generate_problems(20, "heldout", seed=6)
    easy = generate_problems(50, "train", 0, steps=1, max_operand=5, kinds=("arithmetic",))
    hard = generate_problems(50, "train", 0, steps=5, max_operand=99, kinds=("arithmetic",))
    assert max(int(p["answer"]) for p in easy) < max(int(p["answer"]) for p in hard)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split 'test'"):
        generate_problems(1, "test", 0)
    with pytest.raises(ValueError, match="unknown"):
        generate_problems(1, "train", 0, kinds=("geometry",))
    with pytest.raises(ValueError, match="found only"):
        generate_problems(500, "train", 0, steps=1, max_operand=2, kinds=("linear",))


@pytest.mark.parametrize(
    "text,boxed,well_formed",
    [
        ("so \\boxed{42}.", "42", True),
        ("\\boxed{-7}\n", "-7", True),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True),
        ("no answer", None, False),
        ("\\boxed{3} then \\boxed{4}", "4", False),
        ("\\boxed{5} and more words", "5", False),
        ("\\boxed{}", "", False),
        ("unclosed \\boxed{12", None, False),
        ("\\boxed{1} \\boxed{2", "1", False),
    ],
)
def test_extract_boxed_and_format_check(text, boxed, well_formed):
    assert extract_boxed(text) == boxed
    assert is_well_formed(text) is well_formed


@settings(max_examples=50, deadline=None)
@given(
    answer=st.integers(-(10**6), 10**6), prose=st.text(st.characters(exclude_characters="\\{}"), max_size=50)
)
def test_boxed_answer_survives_any_preceding_prose(answer, prose):
    text = f"{prose}\nThe answer is \\boxed{{{answer}}}."
    assert extract_boxed(text) == str(answer) and is_well_formed(text)


def test_math_verify_accepts_the_worked_solutions():
    from math_verify import parse, verify

    for problem in generate_problems(20, "heldout", seed=0, steps=3):
        assert verify(parse(f"${problem['answer']}$"), parse(problem["solution"]))
        assert not verify(parse(f"${int(problem['answer']) + 1}$"), parse(problem["solution"]))


def test_trl_rows():
    problem = generate_problems(1, "train", 0)[0]
    assert [m["role"] for m in sft_example(problem)["messages"]] == ["user", "assistant"]
    row = rl_example(problem)
    assert (
        row["prompt"] == [{"role": "user", "content": problem["prompt"]}]
        and row["answer"] == problem["answer"]
    )
