"""dsv3/store/fingerprint.py: a content hash of local files that changes when a byte does, cached by stat."""

import os

from dsv3.store import fingerprint
from dsv3.store.fingerprint import content_hash


def test_content_hash_follows_content_and_is_cached(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("alpha")
    (corpus / "b.jsonl").write_text('{"text": "beta"}\n')
    cache = tmp_path / "runs"
    first = content_hash([corpus], cache)
    assert first == content_hash([corpus / "b.jsonl", corpus / "a.txt"], cache)  # same files, any order

    hashed = []
    real = fingerprint.file_sha256
    monkeypatch.setattr(fingerprint, "file_sha256", lambda path: hashed.append(path.name) or real(path))
    assert content_hash([corpus], cache) == first and hashed == []  # unchanged stats: nothing re-read

    (corpus / "a.txt").write_text("alphA")  # same size, new content
    stat = (corpus / "a.txt").stat()
    os.utime(corpus / "a.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    changed = content_hash([corpus], cache)
    assert changed != first and hashed == ["a.txt"]
    assert content_hash([tmp_path / "missing"], cache) == ""
