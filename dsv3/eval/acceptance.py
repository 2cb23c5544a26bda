"""MTP draft acceptance (DeepSeek-V3 report §5.4.3): the share of the MTP module's drafts the main model accepts
in greedy speculative decoding (85–90% for the second token in the report)."""

from __future__ import annotations

import torch

from dsv3.infer.speculative import mtp_speculative_decode


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
