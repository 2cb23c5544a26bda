"""Packing documents into fixed-length training rows (paper §4.2: documents are packed without
cross-document attention masking during pre-training).

Documents are concatenated, each followed by EOS, and the stream is cut into rows of exactly `seq_len`
tokens. The last partial row is dropped (its length is reported as `dropped_tokens`), so every row is full
and no padding token is ever trained on.

`position_ids` count tokens since the later of the document's start and the row's start: they restart at 0
where a document starts, and every row starts at 0 (a row that begins mid-document cannot see the
document's beginning). Pre-training may ignore them; SFT builds its sample masks from the restarts.
"""

from collections.abc import Iterable

import numpy as np


def pack_documents(token_lists: Iterable[list[int]], seq_len: int, eos_id: int) -> dict:
    """Pack documents into rows.

    Returns {"input_ids": (N, T) int32, "position_ids": (N, T) int32, "dropped_tokens": int}, T = seq_len.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    docs = [np.asarray(doc, dtype=np.int32) for doc in token_lists]
    lengths = np.array([len(doc) + 1 for doc in docs], dtype=np.int64)  # + EOS
    eos = np.array([eos_id], dtype=np.int32)
    stream = np.concatenate([part for doc in docs for part in (doc, eos)]) if docs else np.zeros(0, np.int32)
    doc_starts = np.cumsum(lengths) - lengths
    since_doc_start = np.arange(len(stream)) - np.repeat(doc_starts, lengths)  # (S,)
    n_rows = len(stream) // seq_len
    kept = n_rows * seq_len
    since_row_start = np.arange(kept) % seq_len
    positions = np.minimum(since_doc_start[:kept], since_row_start)
    return {
        "input_ids": stream[:kept].reshape(n_rows, seq_len),
        "position_ids": positions.astype(np.int32).reshape(n_rows, seq_len),
        "dropped_tokens": int(len(stream) - kept),
    }
