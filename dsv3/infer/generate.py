"""Streaming generation from a checkpoint directory: what `dsv3 generate` and `dsv3 chat` run.

A checkpoint is a save_pretrained directory of a DSV3ForCausalLM with the tokenizer files beside the weights (the
pretraining and SFT stages write them so). Decoding uses absorbed MLA over the compressed cache (dsv3.infer.absorbed)
for every step after the prefill; `speculative=True` drafts with the MTP module (dsv3.infer.speculative, greedy).
A plain prompt is fed after an EOS, the separator every document followed in pretraining (packing puts EOS between
documents and adds no BOS); a conversation goes through the tokenizer's chat template.
"""

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoTokenizer, TextStreamer

from dsv3.infer.absorbed import absorb_attention
from dsv3.infer.speculative import DecodeResult, greedy_decode, mtp_speculative_decode
from dsv3.model import DSV3ForCausalLM
from dsv3.model.hf import check_dsv3_checkpoint


def load_checkpoint(path: str | Path) -> tuple[DSV3ForCausalLM, object]:
    """The model (eval mode, absorbed MLA decoding) and its tokenizer; a one-line ValueError for a bad directory."""
    path = Path(path)
    check_dsv3_checkpoint(path, causal_lm=True)
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"no tokenizer.json in {path}: copy the tokenizer files next to the weights")
    try:
        model = DSV3ForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, RuntimeError, KeyError, SafetensorError) as err:
        raise ValueError(
            f"cannot load {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None
    return absorb_attention(model.eval()), tokenizer


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """(1, T) ids of a plain prompt: EOS (the document separator of pretraining) then the text, no other specials."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return torch.tensor([[tokenizer.eos_token_id, *ids]])


def chat_ids(tokenizer, messages: list[dict]) -> torch.Tensor:
    """(1, T) ids of a conversation in the tokenizer's chat template, ending with the assistant prompt."""
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return torch.tensor([list(ids)])


@torch.no_grad()
def generate(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    speculative: bool = False,
    seed: int = 0,
    stream: bool = True,
) -> DecodeResult:
    """Generate after input_ids (1, T), printing tokens to stdout as they come when `stream`.

    temperature 0 = greedy; > 0 samples (transformers' generate, not with speculative decoding, which is greedy).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if speculative and temperature > 0:
        raise ValueError("speculative decoding is greedy: use --temperature 0 with --speculative")
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    eos = tokenizer.eos_token_id
    if speculative:
        return mtp_speculative_decode(model, input_ids, max_new_tokens, eos, streamer)
    if temperature == 0:
        return greedy_decode(model, input_ids, max_new_tokens, eos, streamer)
    torch.manual_seed(seed)
    start = time.perf_counter()
    sequences = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        streamer=streamer,
    )
    new_tokens = sequences.shape[1] - input_ids.shape[1]
    return DecodeResult(sequences, new_tokens, main_forwards=new_tokens, seconds=time.perf_counter() - start)


def chat(
    model,
    tokenizer,
    read_line: Callable[[], str] = input,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    speculative: bool = False,
    seed: int = 0,
) -> int:
    """Interactive loop: read a user turn, stream the assistant's reply, keep the conversation; stop on EOF or
    "exit". Returns the number of turns answered."""
    if tokenizer.chat_template is None:
        raise ValueError("the checkpoint's tokenizer has no chat template: use `dsv3 generate` instead")
    messages, turns = [], 0
    while True:
        try:
            line = read_line()
        except EOFError:
            break
        if line.strip() in ("exit", "quit"):
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = chat_ids(tokenizer, messages)
        result = generate(model, tokenizer, ids, max_new_tokens, temperature, speculative, seed + turns)
        reply = result.sequences[0, ids.shape[1] :]
        messages.append({"role": "assistant", "content": tokenizer.decode(reply, skip_special_tokens=True)})
        turns += 1
    return turns


def report_speed(result: DecodeResult, speculative: bool) -> None:
    """One line on stderr: tokens, tokens/s and, for speculative decoding, the acceptance rate."""
    line = f"[{result.new_tokens} tokens, {result.tokens_per_second:.1f} tokens/s"
    if speculative:
        line += f", MTP acceptance {result.acceptance_rate:.0%} ({result.accepted}/{result.drafted})"
    print(line + "]", file=sys.stderr)
