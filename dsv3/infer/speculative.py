"""Speculative decoding with the MTP module as the draft model (DeepSeek-V3 report §2.2 "MTP in inference", §5.4.3).

Each step the first MTP module drafts the token after next from the main model's last hidden state (before the
final norm) and the embedding of the newest token; the main model then verifies [newest token, draft] in one
forward. Acceptance is greedy: the draft is kept only if it equals the main model's argmax, and that forward's
second prediction comes for free, so a step yields two tokens when the draft is accepted and one otherwise; the
output is token for token the greedy decoding of the main model. On rejection the main cache drops the draft's
entry (DynamicCache.crop); the MTP module keeps its own cache, which only ever holds accepted positions.

Bookkeeping at the start of a step, with seq[0..L] the tokens so far (seq[L] not yet fed to the main model):
main cache = positions 0..L-1; MTP cache = 0..start-1; pending MTP inputs = (h_i, Emb(seq[i+1])) for
i = start..L-1 (one or two positions). Depth 1 only: one draft per step, as the report evaluates.
"""

import time
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from dsv3.model.model import attention_mask_4d


@dataclass
class DecodeResult:
    """sequences (1, prompt + new); drafted / accepted: MTP drafts proposed / kept (0 for plain decoding);
    main_forwards: forward passes of the main model (prefill included); seconds: wall time of the decode."""

    sequences: torch.LongTensor
    new_tokens: int
    drafted: int = 0
    accepted: int = 0
    main_forwards: int = 0
    seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def main_forward(model, input_ids: torch.Tensor, cache: DynamicCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Main model on the new tokens (1, T) -> logits (1, T, V) and hidden states before the final norm (1, T, C)."""
    out = model.model(input_ids=input_ids, cache=cache, use_cache=True)
    return model.lm_head(out.last_hidden_state), out.hidden_before_norm


def mtp_logits(
    model, hidden: torch.Tensor, next_ids: torch.Tensor, cache: DynamicCache, start: int
) -> torch.Tensor:
    """MTP module 1 at positions start..start+P-1 (eqs. 21-23): hidden (1, P, C) the main model's states there,
    next_ids (1, P) the token after each position -> logits (1, P, V) for the token after that."""
    layer = model.model.layers[model.config.num_hidden_layers]
    P = next_ids.shape[1]
    positions = torch.arange(start, start + P, device=next_ids.device)[None]
    cos, sin = model.model.rotary_emb(positions)
    emb = model.model.embed_tokens(next_ids)
    _, normed, _ = layer(hidden, emb, cos, sin, attention_mask_4d(positions, None, start), cache=cache)  # eqs. 21-22
    return model.lm_head(normed)  # eq. 23


def check_single_prompt(input_ids: torch.Tensor) -> None:
    if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must have shape (1, T) with T >= 1, got {tuple(input_ids.shape)}: decode one prompt at a time"
        )


def finish(tokens: list[int], max_new_tokens: int, eos_token_id: int | None) -> tuple[list[int], bool]:
    """Cut the new tokens at max_new_tokens and just after the first EOS; True when generation is over."""
    if eos_token_id is not None and eos_token_id in tokens:
        tokens = tokens[: tokens.index(eos_token_id) + 1]
        return tokens[:max_new_tokens], True
    return tokens[:max_new_tokens], len(tokens) >= max_new_tokens


@torch.no_grad()
def greedy_decode(
    model, input_ids, max_new_tokens: int, eos_token_id: int | None = None, streamer=None
) -> DecodeResult:
    """Plain greedy decoding, one main-model forward per token: the reference speculative decoding must equal."""
    check_single_prompt(input_ids)
    start_time = time.perf_counter()
    cache, ids, new = DynamicCache(config=model.config), input_ids, []
    if streamer is not None:
        streamer.put(input_ids.cpu())
    done = max_new_tokens <= 0
    while not done:
        logits, _ = main_forward(model, ids, cache)
        ids = logits[:, -1:].argmax(dim=-1)
        new, done = finish(new + [ids.item()], max_new_tokens, eos_token_id)
        if streamer is not None:
            streamer.put(ids.cpu())
    if streamer is not None:
        streamer.end()
    return DecodeResult(
        torch.cat((input_ids, input_ids.new_tensor([new])), dim=1),
        len(new),
        main_forwards=len(new),
        seconds=time.perf_counter() - start_time,
    )


@torch.no_grad()
def mtp_speculative_decode(
    model, input_ids, max_new_tokens: int, eos_token_id: int | None = None, streamer=None
) -> DecodeResult:
    """Greedy decoding of `model` (a DSV3ForCausalLM with num_nextn_predict_layers >= 1), drafting with MTP module 1.

    input_ids (1, T). The returned sequences equal greedy_decode's (and model.generate(do_sample=False)'s);
    acceptance_rate = accepted / drafted.
    """
    check_single_prompt(input_ids)
    if model.config.num_nextn_predict_layers < 1:
        raise ValueError(
            "the model has no MTP module (num_nextn_predict_layers = 0): speculative decoding needs one"
        )
    start_time = time.perf_counter()
    cache, mtp_cache = DynamicCache(config=model.config), DynamicCache()
    if streamer is not None:
        streamer.put(input_ids.cpu())
    logits, hidden = main_forward(model, input_ids, cache)  # prefill
    token = logits[:, -1:].argmax(dim=-1)  # (1, 1) seq[L]
    new, done = finish([token.item()], max_new_tokens, eos_token_id)
    if streamer is not None and new:
        streamer.put(token.cpu())
    pending_hidden, pending_next, mtp_start = hidden, torch.cat((input_ids[:, 1:], token), dim=1), 0
    drafted = accepted = 0
    forwards = 1
    while not done:
        draft = mtp_logits(model, pending_hidden, pending_next, mtp_cache, mtp_start)[:, -1:].argmax(dim=-1)
        mtp_start += pending_next.shape[1]
        logits, hidden = main_forward(
            model, torch.cat((token, draft), dim=1), cache
        )  # verify positions L, L+1
        forwards += 1
        verified = logits.argmax(dim=-1)  # (1, 2): the main model's tokens for positions L+1, L+2
        drafted += 1
        if verified[0, 0] == draft[0, 0]:
            accepted += 1
            step, pending_hidden, pending_next = verified, hidden, verified
        else:
            cache.crop(-1)  # drop the rejected draft's latent and RoPE key
            step, pending_hidden, pending_next = verified[:, :1], hidden[:, :1], verified[:, :1]
        token = step[:, -1:]
        before = len(new)
        new, done = finish(new + step[0].tolist(), max_new_tokens, eos_token_id)
        if streamer is not None and len(new) > before:
            streamer.put(input_ids.new_tensor(new[before:]))
    if streamer is not None:
        streamer.end()
    return DecodeResult(
        torch.cat((input_ids, input_ids.new_tensor([new])), dim=1),
        len(new),
        drafted=drafted,
        accepted=accepted,
        main_forwards=forwards,
        seconds=time.perf_counter() - start_time,
    )
