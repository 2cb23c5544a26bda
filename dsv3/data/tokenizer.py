"""Byte-level BPE tokenizer in DeepSeek-V3's spirit (paper §4.1 "Data Construction").

* Byte-level BPE: every string is encodable and decoding gives back the exact bytes.
* Pre-tokenizer: each digit is its own pre-token; punctuation may merge with the line breaks that follow it
  (".\\n", ":\\n", ")\\n\\n" can become single tokens), as in DeepSeek-V3's released tokenizer.
* Token-boundary bias: the paper splits "a certain proportion" of those punctuation + line-break tokens at
  random during training (`split_merged_punctuation`).

Two views of one tokenizer:
* the raw `tokenizers.Tokenizer` returned by `train_tokenizer` / `load_tokenizer` is the *data* tokenizer:
  text never turns into a control token (a document that contains the string "<|eos|>" is encoded as plain
  text); control tokens (EOS, FIM sentinels) are inserted by id.
* the transformers fast tokenizer written by `save_tokenizer` is the *chat* tokenizer used by TRL and
  `AutoTokenizer`: its chat template writes role markers as strings, which it maps to their special ids.
"""

import hashlib
import json
import random
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
FIM_BEGIN = "<|fim_begin|>"
FIM_HOLE = "<|fim_hole|>"
FIM_END = "<|fim_end|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, FIM_BEGIN, FIM_HOLE, FIM_END, SYSTEM, USER, ASSISTANT)
"""Ids 0..8 in this order. An assistant turn ends with EOS, as in DeepSeek-V3's chat format."""

BYTE_ALPHABET_SIZE = 256

# Words with an optional leading non-letter (" foo", "_foo"); punctuation runs with an optional leading space
# and the line breaks that follow them; whitespace runs (the last space stays with the next word).
PRE_TOKEN_PATTERN = (
    r"[^\r\n\p{L}\p{P}\p{S}\p{N}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)


def check_text(text: str) -> str:
    """Return `text` if it is valid Unicode (encodable as UTF-8); raise a one-line ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"expected a str to tokenize, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start]
        raise ValueError(
            f"text contains a lone surrogate U+{ord(bad):04X} at index {err.start}, which is not valid Unicode; "
            "read the source with errors='replace' (or fix its encoding) before tokenizing"
        ) from None
    return text


def checked_texts(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        yield check_text(text)


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with DeepSeek-style pre-tokenization and the special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Split(Regex(PRE_TOKEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train byte-level BPE on `texts`; the 256 byte symbols and `SPECIAL_TOKENS` are always in the vocab."""
    smallest = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < smallest:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {smallest}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency} must be >= 1")
    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(checked_texts(texts), trainer=trainer)
    tokenizer.encode_special_tokens = True
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the data tokenizer from a directory holding tokenizer.json (or from the file itself)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(
            f"no tokenizer at {file}: train one first (the tokenizer stage writes tokenizer.json)"
        )
    tokenizer = Tokenizer.from_file(str(file))
    missing = [token for token in SPECIAL_TOKENS if tokenizer.token_to_id(token) is None]
    if missing:
        raise ValueError(f"{file} lacks the special tokens {missing}: it was not made by dsv3.data.tokenizer")
    tokenizer.encode_special_tokens = True
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out_dir: str | Path, chat_template: str) -> Path:
    """Write tokenizer.json plus a transformers fast-tokenizer directory (bos/eos/pad, chat template) to out_dir.

    `transformers.AutoTokenizer.from_pretrained(out_dir)` and TRL load the result.
    """
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chat_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer.to_str()),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[FIM_BEGIN, FIM_HOLE, FIM_END, SYSTEM, USER, ASSISTANT],
        clean_up_tokenization_spaces=False,
    )
    chat_tokenizer.chat_template = chat_template
    chat_tokenizer.save_pretrained(str(out_dir))
    return out_dir


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of one document; raises ValueError on text that is not valid Unicode."""
    return tokenizer.encode(check_text(text), add_special_tokens=False).ids


def encode_batch(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(list(checked_texts(texts)), add_special_tokens=False)]


def decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    """Exact inverse of `encode` (special tokens are written out as their strings)."""
    return tokenizer.decode(ids, skip_special_tokens=False)


def byte_level_table() -> dict[str, int]:
    """The byte-level alphabet: printable character -> the byte it stands for (GPT-2's bytes_to_unicode)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(BYTE_ALPHABET_SIZE):
        if b not in printable:
            table[chr(BYTE_ALPHABET_SIZE + shifted)] = b
            shifted += 1
    return table


def token_bytes(tokenizer: Tokenizer, token_id: int, table: Mapping[str, int]) -> bytes | None:
    """The bytes a (non-special) token stands for; None for special tokens."""
    token = tokenizer.id_to_token(token_id)
    if token is None or token in SPECIAL_TOKENS:
        return None
    return bytes(table[ch] for ch in token)


def punctuation_line_break_parts(text: str) -> tuple[str, str] | None:
    """(" .", "\\n\\n") for " .\\n\\n": the punctuation part and the line-break part, or None if `text` is not one."""
    body = text.rstrip("\r\n")
    breaks = text[len(body) :]
    marks = body[1:] if body.startswith(" ") else body
    if not breaks or not marks or not all(unicodedata.category(ch)[0] in "PS" for ch in marks):
        return None
    return body, breaks


def merged_punctuation_table(tokenizer: Tokenizer) -> dict[int, list[int]]:
    """Map each token that merges punctuation with line breaks to the ids of its separately encoded pieces."""
    alphabet = byte_level_table()
    table = {}
    for token_id in range(tokenizer.get_vocab_size(with_added_tokens=False)):
        raw = token_bytes(tokenizer, token_id, alphabet)
        if raw is None:
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # a partial UTF-8 sequence: not a whole punctuation mark
            continue
        parts = punctuation_line_break_parts(text)
        if parts is None:
            continue
        pieces = [i for part in parts for i in encode(tokenizer, part)]
        if len(pieces) > 1:
            table[token_id] = pieces
    return table


def split_merged_punctuation(
    ids: list[int], tokenizer_or_table: Tokenizer | Mapping[int, list[int]], rate: float, rng: random.Random
) -> list[int]:
    """Token-boundary randomisation (paper §4.1): re-encode a fraction `rate` of the punctuation + line-break
    tokens as their separate pieces. The decoded text is unchanged; only the token boundaries move.

    Given a tokenizer, the table is rebuilt on every call; per document, pass `merged_punctuation_table(tok)`.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"split rate {rate} must lie in [0, 1]")
    table = (
        merged_punctuation_table(tokenizer_or_table)
        if isinstance(tokenizer_or_table, Tokenizer)
        else tokenizer_or_table
    )
    if rate == 0.0 or not table:
        return list(ids)
    out = []
    for token_id in ids:
        pieces = table.get(token_id)
        if pieces is not None and rng.random() < rate:
            out.extend(pieces)
        else:
            out.append(token_id)
    return out


def bytes_per_token(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
    """UTF-8 bytes per token over `texts`: the compression the tokenizer achieves (higher is better)."""
    n_bytes = n_tokens = 0
    for text in texts:
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(encode(tokenizer, text))
    if n_tokens == 0:
        raise ValueError("bytes_per_token needs at least one non-empty text")
    return n_bytes / n_tokens


def vocab_usage(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
    """Fraction of the vocabulary (special tokens included) that occurs when encoding `texts`."""
    used: set[int] = set()
    for text in texts:
        used.update(encode(tokenizer, text))
    return len(used) / tokenizer.get_vocab_size(with_added_tokens=True)


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """A stable hash of what turns text into ids: added tokens, normalizer, pre-tokenizer, vocab and merges.

    The post-processor is left out (data encoding never adds special tokens; transformers' save_pretrained
    adds an empty one), so a tokenizer hashes the same before saving and after loading.
    """
    definition = json.loads(tokenizer.to_str())
    relevant = {key: definition[key] for key in ("added_tokens", "normalizer", "pre_tokenizer", "model")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode("utf-8")).hexdigest()


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) UTF-8 bytes each token id stands for; 0 for special tokens and unused ids (for bits per byte)."""
    table = byte_level_table()
    lengths = torch.zeros(vocab_size, dtype=torch.float64)
    for token_id in range(tokenizer.get_vocab_size(with_added_tokens=True)):
        raw = token_bytes(tokenizer, token_id, table)
        lengths[token_id] = 0 if raw is None else len(raw)
    return lengths
