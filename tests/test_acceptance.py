"""dsv3/eval/acceptance.py: the MTP draft's acceptance read teacher-forced on held-out rows — all of a draft that
predicts what the main model will, none of one that never does — and the windows the measurements use."""

import pytest
import torch

from dsv3.eval.acceptance import acceptance_prompts, teacher_forced_acceptance
from tests.test_speculative import V, random_model, successor_model


def test_a_draft_that_predicts_the_main_models_choice_is_always_accepted():
    row = torch.arange(5, 5 + 20)[None] % V  # text the successor rule writes
    assert teacher_forced_acceptance(successor_model(mtp_agrees=True, attention_scale=0.0), [row]) == 1.0
    assert teacher_forced_acceptance(successor_model(mtp_agrees=False, attention_scale=0.0), [row]) == 0.0


def test_the_rate_counts_every_position_of_every_row():
    model = random_model()
    rows = [torch.randint(0, V, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 9)]
    rate = teacher_forced_acceptance(model, rows)
    per_row = [teacher_forced_acceptance(model, [r]) for r in rows]
    # 4 and 8 drafts: the pooled rate weighs each row by its positions
    assert rate == pytest.approx((per_row[0] * 4 + per_row[1] * 8) / 12)
    with pytest.raises(ValueError, match="no position to draft"):
        teacher_forced_acceptance(model, [torch.tensor([[1, 2]])])


class WordTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(w) for w in text.split()]}


def test_prompts_are_windows_spread_over_the_text():
    texts = [" ".join(["a"] * 10), " ".join(["bb"] * 10)]
    prompts = acceptance_prompts(WordTokenizer(), texts, 3, 4)
    assert [p.shape for p in prompts] == [(1, 4)] * 3
    assert prompts[0].tolist() == [[1, 1, 1, 1]] and prompts[-1].tolist() == [[2, 2, 2, 0]]
    with pytest.raises(ValueError, match="fewer than one 50-token prompt"):
        acceptance_prompts(WordTokenizer(), texts, 3, 50)
