import random
import re

import pytest

from dsv3.data.generated import (
    RETRIEVAL_VALUE_DIGITS,
    copy_document,
    corpus_words,
    generated_documents,
    math_as_code,
    math_document,
    retrieval_document,
)
from dsv3.data.math_tasks import arithmetic_problem, problem_split
from dsv3.data.passkeys import key_split

WORDS = [f"w{chr(97 + i)}{chr(97 + j)}" for i in range(10) for j in range(10)]


def test_corpus_words_are_frequent_words_most_frequent_first():
    texts = ["alpha beta beta gamma gamma gamma x1 " * 3] + [f"zz{chr(97 + i // 26)}{chr(97 + i % 26)} " for i in range(60)] * 3
    words = corpus_words(texts, count=3, min_count=3)
    assert words == ["gamma", "beta", "alpha"]
    with pytest.raises(ValueError, match="need >= 50; give the corpus more text or set data.mixture: null"):
        corpus_words(["few words only"])


def test_copy_documents_are_spans_written_twice():
    """Every item of a copy document is a gap item or part of a span whose second copy follows within 16 items."""
    for seed in range(20):
        rng = random.Random(seed)
        doc = copy_document(rng, WORDS, min_items=80, max_items=160, span=(6, 40))
        items = re.findall(r"\w+", doc)
        assert 80 <= len(items) < 160 + 8 + 16 + 2 * 40
        seen: dict[tuple, int] = {}
        covered: set[int] = set()
        for i in range(len(items) - 5):
            gram = tuple(items[i : i + 6])
            if gram in seen and i - seen[gram] <= 56:  # a span (<= 40) plus the gap b (<= 16) back
                covered.update(range(i, i + 6))
            seen.setdefault(gram, i)
        assert len(covered) >= 0.2 * len(items), doc  # second copies: ~40% of the items on average


def test_retrieval_lookups_answer_with_the_stored_value_and_never_five_digits():
    for seed in range(40):
        doc = retrieval_document(random.Random(seed), WORDS)
        if "pass key" in doc:
            (key,) = set(re.findall(r"pass key is (\d+)", doc))
            assert key_split(key) == "train" and doc.endswith(f"The pass key is {key}.\n")
            continue
        stored = dict(re.findall(r"The code of (\w+) is (\w+)\.(?! What)", doc)) or {
            k: v.strip("'") for k, v in re.findall(r"    '(\w+)': ('?\w+'?),", doc)
        }
        assert stored
        for match in re.finditer(r"What is the code of (\w+)\? The code of \1 is (\w+)\.", doc):
            assert stored[match.group(1)] == match.group(2)
        for match in re.finditer(r"\['(\w+)'\] == ('?\w+'?)", doc):
            assert stored[match.group(1)] == match.group(2).strip("'")
        assert "What is the code of" in doc or "assert " in doc
        assert not any(len(v) == 5 and v.isdigit() for v in stored.values())
    assert 5 not in RETRIEVAL_VALUE_DIGITS


def test_math_documents_hold_only_train_problems_and_true_arithmetic():
    for seed in range(30):
        doc = math_document(random.Random(seed))
        assert "\\boxed" not in doc and "<|" not in doc
        for a, op, b, result in re.findall(r"(-?\d+) ([-+*]|//) \(?(-?\d+)\)? = (-?\d+)", doc):
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "//": int(a) // int(b)}[op]
            assert value == int(result), doc


def test_math_as_code_runs_to_the_answer():
    rng = random.Random(3)
    for _ in range(20):
        canonical, question, solution, answer = arithmetic_problem(rng, 3, 20)
        if problem_split(canonical) != "train":
            continue
        namespace: dict = {}
        code = math_as_code(canonical, question, solution, answer).replace("print(", "result = (")
        exec(code, namespace)  # noqa: S102 - our own generated code
        assert namespace["result"] == answer


def test_documents_depend_on_seed_and_index_only():
    a = generated_documents("copy", 5, 7, WORDS)
    assert generated_documents("copy", 3, 7, WORDS) == a[:3]
    assert generated_documents("copy", 5, 8, WORDS) != a
    with pytest.raises(ValueError, match="unknown generated source"):
        generated_documents("poetry", 1, 0, WORDS)
