"""In-context copying (Olsson et al. 2022, "In-context learning and induction heads"): the loss on the second copy
of a repeated sequence of random tokens.

A row is `x x` with x a uniformly random sequence of `length` ordinary tokens. The first copy cannot be predicted
(≈ ln V nats per token, or worse for a model confident in other tokens); the second can be, exactly, by a model
that looks back for the current token's earlier occurrence and copies what followed it — the circuit passkey
retrieval needs. The induction gain = first-copy loss − second-copy loss: ≈ 0 without copying, up to ≈ ln V.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def ordinary_token_ids(tokenizer) -> list[int]:
    """Every id of a `tokenizers.Tokenizer` except its added (special) tokens: what random sequences draw from."""
    special = tokenizer.get_added_tokens_decoder()
    return [i for i in range(tokenizer.get_vocab_size(with_added_tokens=True)) if i not in special]


def copy_probe_rows(tokenizer, seed: int, rows: int = 16, length: int = 64) -> torch.Tensor:
    """The stages' copying probe: `rows` random sequences of `length` ordinary tokens, each repeated (rows, 2·length)."""
    return repeated_random_rows(ordinary_token_ids(tokenizer), rows, length, seed)


def repeated_random_rows(token_ids: Sequence[int], rows: int, length: int, seed: int) -> torch.Tensor:
    """(rows, 2·length) token ids: each row a random sequence drawn from `token_ids`, then the same again."""
    if rows < 1 or length < 2:
        raise ValueError(f"need rows >= 1 and length >= 2, got rows={rows}, length={length}")
    if len(token_ids) < 2:
        raise ValueError("need at least two token ids to draw random sequences from")
    pool = torch.as_tensor(list(token_ids), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    first = pool[torch.randint(len(pool), (rows, length), generator=generator)]
    return torch.cat([first, first], dim=1)


@torch.no_grad()
def copy_losses(model, rows: torch.Tensor, batch_size: int = 16) -> dict[str, float]:
    """Mean next-token loss (nats) on the first copy's targets (positions 1..L−1) and on the second copy's
    (positions L+1..2L−1: each follows a token seen once before; the copy's first token does not) of rows (N, 2L)
    from `repeated_random_rows`, and the induction gain (first − second)."""
    length = rows.shape[1] // 2
    was_training = model.training
    model.eval()
    try:
        losses = []
        for start in range(0, rows.shape[0], batch_size):
            ids = rows[start : start + batch_size]
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (B, 2L−1, V)
            losses.append(F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none"))  # (B, 2L−1)
        loss = torch.cat(losses)
    finally:
        model.train(was_training)
    first, second = loss[:, : length - 1].mean().item(), loss[:, length:].mean().item()
    return {"first_copy_loss": first, "second_copy_loss": second, "induction_gain": first - second}
