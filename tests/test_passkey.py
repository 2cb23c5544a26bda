"""dsv3/eval/passkey.py: prompts of the exact length with the key once at the requested depth; held-out keys and
filler disjoint from the training ones; greedy exact-match scoring on a model that copies the needle's digits."""

import random
from types import SimpleNamespace

import pytest
import torch

from dsv3.data.tokenizer import train_tokenizer
from dsv3.eval.passkey import SPLITS, PasskeyTask, draw_key, evaluate_passkey, key_split, plot_passkey_heatmap

TRAIN_FILLER = [f"def train_{i}(x):\n    return x * {i % 7} + {i % 3}\n" for i in range(300)]
HELDOUT_FILLER = [f"class Held{i}:\n    value = {i % 11}\n    name = 'held{i}'\n" for i in range(300)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(
        TRAIN_FILLER + HELDOUT_FILLER + ["The pass key is 0123456789. What is it?"], vocab_size=400
    )


def test_key_halves_are_disjoint_and_cover_the_space():
    rng = random.Random(0)
    for split in SPLITS:
        keys = {draw_key(rng, 4, split) for _ in range(200)}
        assert {key_split(k) for k in keys} == {split}
    all_keys = [f"{i:04d}" for i in range(10_000)]
    heldout = sum(key_split(k) == "heldout" for k in all_keys)
    assert 4_000 < heldout < 6_000
    with pytest.raises(ValueError, match="split"):
        draw_key(rng, 4, "validation")


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_prompt_has_the_key_once_at_the_depth(tokenizer, depth):
    task = PasskeyTask(tokenizer, HELDOUT_FILLER, "heldout", digits=5, seed=3)
    for index in range(5):
        prompt = task.prompt(300, depth, index)
        assert len(prompt.input_ids) == 300
        text = tokenizer.decode(prompt.input_ids)
        assert text.count(prompt.key) == 1
        assert key_split(prompt.key) == "heldout"
        needle = task.needle_ids(prompt.key)
        assert prompt.input_ids[prompt.needle_start : prompt.needle_start + len(needle)] == needle
        budget = 300 - len(needle) - len(task.question_ids)
        assert abs(prompt.needle_start - depth * budget) <= 0.5
        assert text.endswith("The pass key is ")
        assert prompt.answer_ids == [tokenizer.token_to_id(c) for c in prompt.key]
    assert task.prompt(300, depth, 1) == task.prompt(300, depth, 1)  # seeded


def test_training_documents_use_training_keys_and_filler(tokenizer):
    train = PasskeyTask(tokenizer, TRAIN_FILLER, "train", digits=5, seed=3)
    heldout = PasskeyTask(tokenizer, HELDOUT_FILLER, "heldout", digits=5, seed=3)
    rng = random.Random(1)
    train_keys, heldout_keys = set(), set()
    for i in range(40):
        doc = train.document(200, rng, eos_id=1)
        assert len(doc) == 200 and doc[-1] == 1
        text = tokenizer.decode(doc[:-1])
        key = text.rsplit("The pass key is ", 1)[1]
        train_keys.add(key)
        assert text.count(key) == 2  # once in the needle, once as the answer
        assert "Held" not in text  # training filler only
        heldout_keys.add(heldout.prompt(200, 0.5, i).key)
        assert "train_" not in tokenizer.decode(heldout.prompt(200, 0.5, i).input_ids)
    assert train_keys.isdisjoint(heldout_keys)


def test_too_short_prompt_is_refused(tokenizer):
    task = PasskeyTask(tokenizer, HELDOUT_FILLER, "heldout", digits=5, seed=0)
    with pytest.raises(ValueError, match="too short"):
        task.prompt(10, 0.5, 0)


class CopyNeedle(torch.nn.Module):
    """A hand-made 'model': after the prompt it emits the digits that follow the needle's 'is ' (or wrong ones)."""

    def __init__(self, task: PasskeyTask, correct: bool):
        super().__init__()
        self.task, self.correct, self.vocab = task, correct, task.tokenizer.get_vocab_size()

    def forward(self, input_ids, cache=None, **kwargs):
        cache = [input_ids] if cache is None else [torch.cat([cache[0], input_ids], dim=1)]
        history = cache[0]
        logits = torch.zeros(history.shape[0], 1, self.vocab)
        for b, row in enumerate(history.tolist()):
            needle_at = next(i for i in range(len(row)) if row[i] in self.task.digit_ids)
            produced = len(row) - self.prompt_length
            token = row[needle_at + produced]
            logits[b, 0, token if self.correct else self.task.digit_ids[0]] = 1.0
        return SimpleNamespace(logits=logits, cache=cache)


def test_greedy_exact_match_scoring(tokenizer):
    filler = ["def f(a, b):\n    return a + b\n" for _ in range(50)]  # digit-free filler
    task = PasskeyTask(tokenizer, filler, "heldout", digits=4, seed=0)
    right, wrong = CopyNeedle(task, True), CopyNeedle(task, False)
    right.prompt_length = wrong.prompt_length = 120
    accuracy = evaluate_passkey(right, task, [120], [0.2, 0.8], trials=3, batch_size=2)
    assert accuracy == {(120, 0.2): 1.0, (120, 0.8): 1.0}
    wrong_accuracy = evaluate_passkey(wrong, task, [120], [0.5], trials=4)
    keys = [task.prompt(120, 0.5, i).key for i in range(4)]
    assert wrong_accuracy[(120, 0.5)] == sum(k == "0000" for k in keys) / 4


def test_heatmap_png(tmp_path):
    path = plot_passkey_heatmap(
        {(256, 0.1): 0.0, (256, 0.9): 0.5, (1024, 0.1): 1.0, (1024, 0.9): 0.25}, tmp_path / "p.png", "t"
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
