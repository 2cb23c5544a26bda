"""Data: tokenizer training, corpus sources, FIM, packing, the chat format and verifiable math tasks."""

from dsv3.data.chat import CHAT_TEMPLATE, conversation, format_conversation
from dsv3.data.corpus import hf_corpus, load_corpus, local_corpus, stdlib_corpus
from dsv3.data.dataset import build_lm_dataset, lm_dataset_stats
from dsv3.data.fim import apply_fim, undo_fim
from dsv3.data.math_tasks import extract_boxed, generate_problems, is_well_formed, rl_example, sft_example
from dsv3.data.packing import pack_documents
from dsv3.data.tokenizer import (
    SPECIAL_TOKENS,
    bytes_per_token,
    decode,
    encode,
    load_tokenizer,
    save_tokenizer,
    split_merged_punctuation,
    tokenizer_hash,
    train_tokenizer,
    vocab_usage,
)

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "apply_fim",
    "build_lm_dataset",
    "bytes_per_token",
    "conversation",
    "decode",
    "encode",
    "extract_boxed",
    "format_conversation",
    "generate_problems",
    "hf_corpus",
    "is_well_formed",
    "lm_dataset_stats",
    "load_corpus",
    "load_tokenizer",
    "local_corpus",
    "pack_documents",
    "rl_example",
    "save_tokenizer",
    "sft_example",
    "split_merged_punctuation",
    "stdlib_corpus",
    "tokenizer_hash",
    "train_tokenizer",
    "undo_fim",
    "vocab_usage",
]
