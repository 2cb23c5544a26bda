"""Fill-in-the-Middle in Prefix-Suffix-Middle form (paper §4.1, following DeepSeekCoder-V2).

With probability `rate` per document, before packing, a document becomes

    <|fim_begin|> prefix <|fim_hole|> suffix <|fim_end|> middle

and packing then appends EOS. The two split points are drawn uniformly at character level. FIM works on token
ids: each part is encoded on its own and the sentinels are inserted by id, so a document that happens to
contain a sentinel's text cannot be confused with a transformed one, and `undo_fim` is exact.
"""

import random

from tokenizers import Tokenizer

from dsv3.data.tokenizer import FIM_BEGIN, FIM_END, FIM_HOLE, encode


def fim_split(text: str, rng: random.Random) -> tuple[str, str, str]:
    """(prefix, middle, suffix) at two character positions drawn uniformly from 0..len(text)."""
    i, j = sorted((rng.randint(0, len(text)), rng.randint(0, len(text))))
    return text[:i], text[i:j], text[j:]


def sentinel_ids(tokenizer: Tokenizer) -> tuple[int, int, int]:
    ids = tuple(tokenizer.token_to_id(token) for token in (FIM_BEGIN, FIM_HOLE, FIM_END))
    if None in ids:
        raise ValueError(
            "the tokenizer lacks the FIM sentinels; train it with dsv3.data.tokenizer.train_tokenizer"
        )
    return ids


def psm_parts(text: str, rate: float, rng: random.Random) -> tuple[str, ...]:
    """(text,) or, with probability `rate`, (prefix, suffix, middle): the pieces to encode, in PSM order.

    Draws one `rng.random()` per document, and two split points only when FIM applies, so a seeded `rng`
    gives the same result every time.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"FIM rate {rate} must lie in [0, 1]")
    if rng.random() >= rate:
        return (text,)
    prefix, middle, suffix = fim_split(text, rng)
    return prefix, suffix, middle


def join_psm(part_ids: list[list[int]], tokenizer: Tokenizer) -> list[int]:
    """Token ids of a document from its encoded `psm_parts`: as is, or with the sentinels put in."""
    if len(part_ids) == 1:
        return part_ids[0]
    begin, hole, end = sentinel_ids(tokenizer)
    prefix, suffix, middle = part_ids
    return [begin, *prefix, hole, *suffix, end, *middle]


def apply_fim(text: str, tokenizer: Tokenizer, rate: float, rng: random.Random) -> list[int]:
    """Token ids of `text`, turned into PSM form with probability `rate` (each part encoded on its own)."""
    return join_psm([encode(tokenizer, part) for part in psm_parts(text, rate, rng)], tokenizer)


def undo_fim(ids: list[int], tokenizer: Tokenizer) -> list[int]:
    """Put a PSM document back in reading order (prefix, middle, suffix); other documents are returned as is."""
    begin, hole, end = sentinel_ids(tokenizer)
    if not ids or ids[0] != begin:
        return list(ids)
    try:
        h = ids.index(hole)
        e = ids.index(end, h)
    except ValueError:
        raise ValueError(
            "malformed FIM document: <|fim_begin|> without <|fim_hole|> and <|fim_end|>"
        ) from None
    return [*ids[1:h], *ids[e + 1 :], *ids[h + 1 : e]]
