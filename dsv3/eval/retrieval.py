"""Key-value retrieval accuracy (the copy/retrieval probe, recipes/probes/copy.yaml): greedy decoding of a row's
query answer, exact match — passkey retrieval (dsv3.eval.passkey) on synthetic rows (dsv3.data.probes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dsv3.eval.passkey import greedy_answers


@torch.no_grad()
def retrieval_accuracy(model, rows: Sequence, batch_size: int = 16) -> float:
    """Share of rows whose query is answered exactly: each row (a dsv3.data.probes.KeyValueRow with one query at its
    end) is cut before the answer and decoded greedily for as many tokens as the answer has."""
    if not rows:
        raise ValueError("retrieval accuracy needs at least one row")
    starts = {row.answer_starts[-1] for row in rows}
    widths = {len(row.answers[-1]) for row in rows}
    if len(starts) != 1 or len(widths) != 1:
        raise ValueError("retrieval rows must share one length and one answer length (make them with one call)")
    start, width = starts.pop(), widths.pop()
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for first in range(0, len(rows), batch_size):
            chunk = rows[first : first + batch_size]
            prompts = torch.tensor([row.ids[:start] for row in chunk], dtype=torch.long)
            answers = greedy_answers(model, prompts, width)
            correct += sum(a.tolist() == row.answers[-1] for a, row in zip(answers, chunk, strict=True))
    finally:
        model.train(was_training)
    return correct / len(rows)
