"""Pre-training corpora as `datasets.DatasetDict`s with splits "train" and "validation" and a "text" column.

Three sources (data/README.md says where each byte comes from):
* "stdlib": the embedded default — the running interpreter's standard-library `.py` sources, one document
  per file;
* "local": .txt (one document per file), .jsonl/.json (field `text_field`) and .parquet files or folders;
* "hf": a Hugging Face dataset by name (or a local dataset folder), streamed, first `max_documents`.

Splits are made by hashing each document's text (for "stdlib": each file's content), never by a random
draw, so they are the same on every run and machine, and identical documents (the stdlib has a few
identical files) always share a split: nothing in validation was seen verbatim in training.
"""

import hashlib
import inspect
import json
import os
import sysconfig
from pathlib import Path

import datasets
import pyarrow
import pyarrow.parquet

from dsv3.config import DataSection
from dsv3.errors import InputError

LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
STDLIB_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
STDLIB_TEST_DIRS = {"test", "tests", "idle_test"}


def hash_fraction(key: str) -> float:
    """A number in [0, 1) fixed by `key` (first 8 bytes of its SHA-256)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def split_by_hash(texts: list[str], validation_fraction: float) -> datasets.DatasetDict:
    """Put a document in "validation" when the hash of its text falls below `validation_fraction`.

    With a fraction above 0 and at least two documents, validation is never empty: if no hash falls below
    the fraction, the document with the smallest hash goes there.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction} must lie in [0, 1)")
    fractions = [hash_fraction(text) for text in texts]
    held_out = [f < validation_fraction for f in fractions]
    if validation_fraction > 0 and len(texts) >= 2 and not any(held_out):
        held_out[min(range(len(texts)), key=fractions.__getitem__)] = True
    return datasets.DatasetDict(
        train=datasets.Dataset.from_dict(
            {"text": [t for t, v in zip(texts, held_out, strict=True) if not v]}
        ),
        validation=datasets.Dataset.from_dict(
            {"text": [t for t, v in zip(texts, held_out, strict=True) if v]}
        ),
    )


def stdlib_files(include_tests: bool) -> list[tuple[str, Path]]:
    """(relative path, path) of the standard library's .py files, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = STDLIB_SKIPPED_DIRS | (set() if include_tests else STDLIB_TEST_DIRS)
    files = []
    for folder, dirs, names in os.walk(root, followlinks=True):  # as rglob, but never entering a skipped folder
        dirs[:] = [d for d in dirs if d not in skipped]  # (site-packages: rglob walked it all, ~0.3 s a call)
        for name in names:
            if name.endswith(".py"):
                path = Path(folder, name)
                files.append((path.relative_to(root).as_posix(), path))
    return sorted(files)


def stdlib_corpus(
    max_bytes: int, validation_fraction: float, include_tests: bool = False
) -> datasets.DatasetDict:
    """The standard library's Python sources, in path order, until `max_bytes` of UTF-8 would be exceeded.

    Files that are not valid UTF-8 (a few test fixtures) are skipped. The content depends on the Python
    version; the dataset fingerprints (and so every cache key) follow it.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes={max_bytes} must be >= 1")
    texts, total = [], 0
    for _, path in stdlib_files(include_tests):
        raw = path.read_bytes()
        if total + len(raw) > max_bytes:
            break
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            continue
        total += len(raw)
    return split_by_hash(texts, validation_fraction)


def local_files(paths: str | Path | list[str | Path]) -> dict[str, list[str]]:
    """Expand files and folders into {builder ("text" | "json" | "parquet"): sorted file paths}."""
    if isinstance(paths, str | Path):
        paths = [paths]
    by_builder: dict[str, list[str]] = {}
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
            if not found:
                raise InputError(f"data.paths: {path} holds no {'/'.join(LOCAL_SUFFIXES)} files")
        elif path.is_file():
            if path.suffix not in LOCAL_SUFFIXES:
                raise InputError(f"data.paths: {path} has an unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}")
            found = [path]
        else:
            raise InputError(f"data.paths: {path} does not exist (paths are relative to the working directory)")
        for file in found:
            by_builder.setdefault(LOCAL_SUFFIXES[file.suffix], []).append(str(file))
    return by_builder


def text_column(dataset: datasets.Dataset, text_field: str, source: str) -> list[str]:
    if text_field not in dataset.column_names:
        raise InputError(
            f"data.text_field: {source} has no field {text_field!r} (it has {dataset.column_names}); set data.text_field"
        )
    return [t for t in dataset[text_field] if isinstance(t, str) and t]


def local_corpus(
    paths: str | Path | list[str | Path],
    validation_fraction: float,
    text_field: str = "text",
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """Documents from local files, read with `datasets.load_dataset` ("text" with one document per file,
    "json", "parquet"); empty files and documents are dropped; split by a hash of each document's text. A file
    `datasets` cannot read is named in a one-line InputError (with the line, for JSON lines)."""
    texts = []
    for builder, files in sorted(local_files(paths).items()):
        files = [f for f in files if Path(f).stat().st_size > 0]  # an empty file holds no documents
        if not files:
            continue
        options = {"sample_by": "document"} if builder == "text" else {}
        try:
            loaded = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir, **options)
        except Exception as err:  # noqa: BLE001 - datasets wraps every reader error; find the file ourselves
            why = first_unreadable(builder, files) or f"{builder} files {files[:3]} cannot be read ({err})"
            raise InputError(f"data.paths: {why}".splitlines()[0]) from None
        texts += text_column(loaded, text_field, f"{builder} files {files[:3]}")
    return split_by_hash(texts, validation_fraction)


def first_unreadable(builder: str, files: list[str]) -> str:
    """Why the first of `files` that is not what its suffix says fails, naming the file (and line); "" if none."""
    for file in files:
        try:
            if builder == "parquet":
                pyarrow.parquet.read_metadata(file)
                continue
            text = Path(file).read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            return f"{file} is not UTF-8 text (byte {err.start}); convert it or leave it out"
        except (OSError, pyarrow.ArrowException) as err:
            return f"{file} is not a parquet file ({str(err).splitlines()[0]})"
        if builder == "json":
            rows = [text] if Path(file).suffix == ".json" and text.lstrip().startswith("[") else text.splitlines()
            for number, line in enumerate(rows, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    where = f"{file}:{number}" if len(rows) > 1 else file
                    return f"{where} is not valid JSON ({err.msg} at column {err.colno}); one JSON object per line"
                if not isinstance(row, dict | list):
                    return f"{file}:{number} holds a {type(row).__name__}, not a JSON object with a text field"
    return ""


def is_saved_dataset(path: Path) -> bool:
    """True for a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def hf_corpus(
    name: str,
    validation_fraction: float,
    config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    streaming: bool = True,
    max_documents: int = 100_000,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """The first `max_documents` non-empty texts of a Hugging Face dataset's `split`, streamed by default.

    `name` is a Hub id ("HuggingFaceFW/fineweb-edu", with `config` e.g. "sample-10BT") or a local folder: data
    files that `load_dataset` understands, or the output of `save_to_disk`.
    """
    if max_documents < 1:
        raise ValueError(f"max_documents={max_documents} must be >= 1")
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.exists():
        raise ValueError(f"dataset folder {name} does not exist")
    if looks_local and is_saved_dataset(path):
        saved = datasets.load_from_disk(str(path))
        if isinstance(saved, datasets.DatasetDict):
            if split not in saved:
                raise ValueError(f"{path} has splits {list(saved)}, not {split!r}; set split to one of them")
            saved = saved[split]
        source = saved.to_iterable_dataset() if streaming else saved
    else:
        try:
            source = datasets.load_dataset(name, config, split=split, streaming=streaming, cache_dir=cache_dir)
        except Exception as err:  # noqa: BLE001 - network, name, config or split: say which dataset and why
            raise InputError(
                f"data.hf_name: cannot load dataset {name!r} (config {config!r}, split {split!r}): "
                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}; check the name and your network, "
                "or point data.hf_name at a local folder"
            ) from None
    texts = []
    for example in source:
        if text_field not in example:
            raise ValueError(f"{name} has no field {text_field!r} (it has {list(example)}); set text_field")
        text = example[text_field]
        if isinstance(text, str) and text:
            texts.append(text)
            if len(texts) == max_documents:
                break
    return split_by_hash(texts, validation_fraction)


CORPUS_KINDS = {"stdlib": stdlib_corpus, "local": local_corpus, "hf": hf_corpus}


def load_corpus(kind: str, **kwargs) -> datasets.DatasetDict:
    """Dispatch to the corpus source named `kind` ("stdlib" | "local" | "hf") with its keyword arguments."""
    if kind not in CORPUS_KINDS:
        raise ValueError(f"unknown corpus kind {kind!r}; use one of {', '.join(CORPUS_KINDS)}")
    source = CORPUS_KINDS[kind]
    try:
        inspect.signature(source).bind(**kwargs)
    except TypeError as err:
        allowed = ", ".join(inspect.signature(source).parameters)
        raise ValueError(f"corpus kind {kind!r}: {err}; its arguments are {allowed}") from None
    corpus = source(**kwargs)
    if len(corpus["train"]) == 0:
        where = kwargs.get("paths") or kwargs.get("name") or kind
        raise InputError(
            f"data: the {kind} corpus {where} has no training documents (empty files, or no non-empty "
            f"{kwargs.get('text_field', 'text')!r} strings); give it text"
        )
    return corpus


def recipe_corpus(data: DataSection) -> datasets.DatasetDict:
    """The documents the recipe's data section names: the embedded stdlib corpus, local files, or a HF dataset."""
    if data.source == "stdlib":
        return load_corpus("stdlib", max_bytes=data.max_bytes, validation_fraction=data.validation_fraction)
    if data.source == "local":
        return load_corpus("local", paths=data.paths, validation_fraction=data.validation_fraction, text_field=data.text_field)
    return load_corpus(
        "hf",
        name=data.hf_name,
        config=data.hf_config,
        split=data.hf_split,
        text_field=data.text_field,
        validation_fraction=data.validation_fraction,
        max_documents=data.max_documents or 100_000,
    )


def recipe_data_files(data: DataSection) -> list[str]:
    """The local files and folders the data section reads (their content is part of the reading stages' keys)."""
    if data.source == "local":
        return list(data.paths)
    if data.source == "hf" and data.hf_name and Path(data.hf_name).expanduser().exists():
        return [str(Path(data.hf_name).expanduser())]
    return []


def corpus_source(data: DataSection) -> str:
    """Where the recipe's documents come from (MLflow's dataset source): the stdlib folder, the local files' common
    folder (or the one file), or `hf:<name>` for a dataset on the Hub."""
    if data.source == "stdlib":
        return sysconfig.get_paths()["stdlib"]
    files = recipe_data_files(data)
    if files:
        return os.path.commonpath([str(Path(f).expanduser().resolve()) for f in files])
    return f"hf:{data.hf_name}"


def capped_texts(split: datasets.Dataset, max_bytes: int | None) -> list[str]:
    """The split's texts, in order, until `max_bytes` of UTF-8 would be exceeded (None: all of them)."""
    texts, total = [], 0
    for text in split["text"]:
        size = len(text.encode("utf-8"))
        if max_bytes is not None and texts and total + size > max_bytes:
            break
        texts.append(text)
        total += size
    return texts
