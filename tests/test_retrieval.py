"""dsv3/eval/retrieval.py: greedy exact-match retrieval on the probe's key-value rows — a perfect in-context copier
(an explicit induction rule) answers every held-out query, a model that cannot look back answers none."""

from types import SimpleNamespace

import pytest
import torch

from dsv3.data.probes import ProbeVocab, retrieval_prompts
from dsv3.eval.retrieval import retrieval_accuracy

VOCAB = ProbeVocab()


class RuleModel(torch.nn.Module):
    """Greedy decoding stub: the next token is what followed the last token's previous occurrence (induction), or
    with copy=False the last token again. The "cache" is the sequence so far."""

    def __init__(self, copy: bool):
        super().__init__()
        self.copy = copy

    def forward(self, input_ids, use_cache=True, logits_to_keep=None, cache=None, position_ids=None):
        seq = input_ids if cache is None else torch.cat([cache, input_ids], dim=1)
        logits = torch.zeros(seq.shape[0], 1, VOCAB.size)
        for b, row in enumerate(seq.tolist()):
            nxt = row[-1]
            if self.copy:
                earlier = [i for i in range(len(row) - 1) if row[i] == row[-1]]
                nxt = row[earlier[-1] + 1] if earlier else 0
            logits[b, 0, nxt] = 1.0
        return SimpleNamespace(logits=logits, cache=seq)


@pytest.mark.parametrize("length", [128, 512])
def test_an_induction_rule_retrieves_every_held_out_key_and_no_look_back_none(length):
    prompts = retrieval_prompts(VOCAB, 12, length, seed=0, pairs=4)
    assert retrieval_accuracy(RuleModel(copy=True), prompts, batch_size=5) == 1.0
    assert retrieval_accuracy(RuleModel(copy=False), prompts) == 0.0


def test_rows_of_different_lengths_are_refused():
    rows = retrieval_prompts(VOCAB, 2, 128, 0) + retrieval_prompts(VOCAB, 2, 256, 0)
    with pytest.raises(ValueError, match="one length"):
        retrieval_accuracy(RuleModel(copy=True), rows)
