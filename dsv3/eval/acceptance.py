"""MTP draft acceptance (DeepSeek-V3 report §5.4.3): the share of the MTP module's drafts the main model accepts
in greedy speculative decoding (85–90% for the second token in the report) — on the model's own greedy continuations
(`mtp_acceptance`) and teacher-forced on held-out text (`teacher_forced_acceptance`)."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from dsv3.infer.speculative import main_forward, mtp_logits, mtp_speculative_decode


def acceptance_prompts(tokenizer, texts: list[str], count: int, length: int) -> list[torch.Tensor]:
    """`count` prompts (1, length), windows spread evenly over the tokens of `texts` (EOS between documents, as
    packing puts it); tokenizes only as much text as the windows need."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= 4 * count * length:
            break
    if len(ids) < length:
        raise ValueError(
            f"MTP acceptance: the validation text holds {len(ids)} tokens, fewer than one {length}-token prompt"
        )
    starts = torch.linspace(0, len(ids) - length, count).long().tolist()
    return [torch.tensor([ids[s : s + length]]) for s in starts]


@torch.no_grad()
def mtp_acceptance(model, prompts: list[torch.Tensor], max_new_tokens: int) -> float:
    """Share of MTP drafts the main model accepts when `model` greedily decodes `max_new_tokens` after each prompt
    (1, T) with MTP speculative decoding (report §5.4.3: 85–90% for the second token)."""
    drafted = accepted = 0
    for ids in prompts:
        result = mtp_speculative_decode(model, ids, max_new_tokens)
        drafted, accepted = drafted + result.drafted, accepted + result.accepted
    if not drafted:
        raise ValueError("MTP acceptance: no token was drafted; give prompts and max_new_tokens >= 2")
    return accepted / drafted


@torch.no_grad()
def teacher_forced_acceptance(model, rows: list[torch.Tensor]) -> float:
    """Share of positions t of held-out rows (1, T) where MTP module 1's draft of token t+2 — from the main model's
    state at t and the true token t+1 (eqs. 21-23) — equals the main model's greedy prediction of token t+2 from the
    true prefix through t+1: the acceptance speculative decoding would see were the main model's continuation the
    text itself. A small model's own greedy continuations fall into repetition loops (`____`, `0000`) where drafting
    is trivially right or wrong; this reads the draft on text the model did not write."""
    drafted = accepted = 0
    for ids in rows:
        if ids.shape[1] < 3:
            raise ValueError(f"MTP acceptance: a row of {ids.shape[1]} tokens has no position to draft; give >= 3")
        logits, hidden = main_forward(model, ids, DynamicCache(config=model.config))
        draft = mtp_logits(model, hidden[:, :-1], ids[:, 1:], DynamicCache(), 0).argmax(dim=-1)
        verified = logits[:, 1:].argmax(dim=-1)
        drafted, accepted = drafted + draft.numel(), accepted + int((draft == verified).sum())
    if not drafted:
        raise ValueError("MTP acceptance: no rows given")
    return accepted / drafted
