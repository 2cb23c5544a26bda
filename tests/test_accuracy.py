"""Task accuracy (dsv3/eval/accuracy.py): answers judged on hand-written completions (correct, equivalent,
wrong, unparseable, unboxed, malformed), the unbiased pass@k against brute-force counting, evaluate_accuracy
end to end on a model with canned answers, and batched left-padded greedy generation of a real model equal to
generating each prompt alone."""

import itertools
import math

import pytest
import torch

from dsv3.config import load_recipe
from dsv3.data.chat import CHAT_TEMPLATE
from dsv3.data.math_tasks import generate_problems
from dsv3.data.tokenizer import save_tokenizer, train_tokenizer
from dsv3.eval.accuracy import (
    answer_is_correct,
    evaluate_accuracy,
    generate_completions,
    pass_at_k,
    score_completions,
)
from dsv3.model import DSV3ForCausalLM
from dsv3.stages.pretrain import model_config
from tests.conftest import RECIPES

HAND_JUDGED = [  # completion, reference, correct, well formed
    ("3 * 4 = 12.\nThe answer is \\boxed{12}.", "12", True, True),
    ("The answer is \\boxed{12.0}", "12", True, True),
    ("So x = \\boxed{\\frac{24}{2}}", "12", True, True),
    ("Add 7 to both sides: x = \\boxed{-7}.", "-7", True, True),
    ("The answer is \\boxed{7}.", "-7", False, True),
    ("The answer is \\boxed{13}.", "12", False, True),
    ("The answer is \\boxed{twelve}.", "12", False, True),
    ("The answer is 12.", "12", False, False),
    ("The answer is \\boxed{12", "12", False, False),
    ("The answer is \\boxed{}.", "12", False, False),
    ("\\boxed{11}, no: \\boxed{12}", "12", True, False),
    ("\\boxed{12} because 3 * 4 = 12", "12", True, False),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    problems = generate_problems(300, "train", seed=7)
    raw = train_tokenizer([p["prompt"] + "\n" + p["solution"] for p in problems], vocab_size=512)
    save_tokenizer(raw, folder, CHAT_TEMPLATE)
    return AutoTokenizer.from_pretrained(folder), raw


@pytest.mark.parametrize("completion, reference, correct, well_formed", HAND_JUDGED)
def test_hand_judged_answers(completion, reference, correct, well_formed):
    assert answer_is_correct(completion, reference) is correct
    assert score_completions([[completion]], [reference], [[5]])["format_rate"] == float(well_formed)


def test_scores_of_canned_completions():
    completions = [[c] for c, _, _, _ in HAND_JUDGED]
    references = [r for _, r, _, _ in HAND_JUDGED]
    lengths = [[i + 1] for i in range(len(HAND_JUDGED))]
    scores = score_completions(completions, references, lengths)
    assert scores["accuracy"] == pytest.approx(6 / 12)
    assert scores["pass_at_k"] == scores["accuracy"]
    assert scores["format_rate"] == pytest.approx(7 / 12)
    assert scores["mean_completion_tokens"] == pytest.approx(6.5)


@pytest.mark.parametrize("n, c, k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 1, 2), (4, 4, 4), (8, 3, 5)])
def test_pass_at_k_is_the_share_of_k_subsets_with_a_correct_sample(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / math.comb(n, k))
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(n, c, n + 1)


class CannedModel(torch.nn.Module):
    """Answers the i-th sample for a prompt with replies[prompt][i], whatever the batch and its left padding."""

    def __init__(self, tokenizer, replies: dict[str, list[str]]):
        super().__init__()
        self.tokenizer, self.replies = tokenizer, replies

    @property
    def device(self):
        return torch.device("cpu")

    def generate(
        self, input_ids, attention_mask, max_new_tokens, num_return_sequences, eos_token_id, pad_token_id, **_
    ):
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            (replies,) = [r for p, r in self.replies.items() if p in prompt]
            for i in range(num_return_sequences):
                new = self.tokenizer(replies[i], add_special_tokens=False)["input_ids"] + [eos_token_id]
                rows.append(
                    (ids.tolist() + new + [pad_token_id] * max_new_tokens)[: len(ids) + max_new_tokens]
                )
        return torch.tensor(rows)


def test_evaluate_accuracy_with_canned_answers(tokenizer):
    chat, _ = tokenizer
    problems = [
        {"prompt": "Solve for x: x + 2 = 5.", "answer": "3"},
        {"prompt": "What is 6 * 7?", "answer": "42"},
    ]
    replies = {
        "x + 2 = 5": ["x = 5 - 2 = \\boxed{3}.", "\\boxed{7}", "no idea", "\\boxed{3"],
        "6 * 7": ["6 * 7 = \\boxed{42}", "\\boxed{42}.", "\\boxed{42} and \\boxed{42}", "\\boxed{41}"],
    }
    greedy = evaluate_accuracy(CannedModel(chat, replies), chat, problems, max_new_tokens=64, batch_size=1)
    assert greedy == {
        "accuracy": 1.0,
        "pass_at_k": 1.0,
        "format_rate": 1.0,
        "mean_completion_tokens": greedy["mean_completion_tokens"],
        "truncated_rate": 0.0,
    }
    lengths = [len(chat(r[0], add_special_tokens=False)["input_ids"]) + 1 for r in replies.values()]
    assert greedy["mean_completion_tokens"] == pytest.approx(sum(lengths) / 2)  # EOS counted, padding not
    cut = evaluate_accuracy(CannedModel(chat, replies), chat, problems, max_new_tokens=min(lengths), batch_size=1)
    assert cut["truncated_rate"] == 1.0  # the shorter answer ends exactly at the limit, the longer is cut off
    assert min(lengths) < max(lengths)
    assert evaluate_accuracy(CannedModel(chat, replies), chat, problems, max_new_tokens=max(lengths))[
        "truncated_rate"
    ] == 0.5

    sampled = evaluate_accuracy(
        CannedModel(chat, replies), chat, problems, max_new_tokens=64, batch_size=2, k=2, n=4, temperature=1.0
    )
    assert sampled["accuracy"] == pytest.approx(4 / 8)
    assert sampled["pass_at_k"] == pytest.approx((pass_at_k(4, 1, 2) + pass_at_k(4, 3, 2)) / 2)
    assert sampled["format_rate"] == pytest.approx(5 / 8)
    with pytest.raises(ValueError, match="temperature"):
        evaluate_accuracy(CannedModel(chat, replies), chat, problems, max_new_tokens=8, k=2)


def test_batched_left_padded_greedy_equals_one_prompt_at_a_time(tokenizer):
    chat, raw = tokenizer
    config = model_config(load_recipe(RECIPES / "smoke.yaml"), raw)
    config.initializer_range = 0.1
    torch.manual_seed(0)
    model = DSV3ForCausalLM(config)
    prompts = [p["prompt"] for p in generate_problems(4, "heldout", seed=3, steps=1)]
    assert len({len(chat(p)["input_ids"]) for p in prompts}) > 1  # prompts of different lengths get padded
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batched = generate_completions(model, chat, prompts, max_new_tokens=12, batch_size=4)
        alone = generate_completions(model, chat, prompts, max_new_tokens=12, batch_size=1)
    finally:
        torch.set_num_threads(threads)
    assert batched == alone
