"""Where text comes from: files, directories, globs, JSON Lines, Hugging Face datasets, the default corpus.

A source string is one of

- a text file (read as UTF-8; invalid bytes become U+FFFD with a one-line warning naming the file);
- a ``.jsonl`` file: one JSON object per line, the text under ``text_field`` (default "text");
- a directory: every non-hidden file below it, recursively, in sorted order, filtered by ``extensions``
  when given (binary files found this way are skipped with a warning; a binary file named directly is
  an error);
- a glob (``data/*.txt``, ``corpus/**/*.md``), expanded in sorted order;
- ``hf:NAME[:CONFIG]``: the train split of a Hugging Face dataset through the optional ``datasets``
  package (a local dataset folder works offline; a hub name downloads).

No sources means the embedded default corpus: the running Python's standard library sources (see
:func:`default_corpus_files`), so training works on any machine without a download.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence

from ..errors import UserError

log = logging.getLogger(__name__)

BINARY_PROBE = 8192  # bytes inspected for NUL bytes when deciding that a file is binary
GLOB_CHARS = set("*?[")
# Folders of the standard library left out of the default corpus: installed third-party packages and
# byte-code caches.
DEFAULT_CORPUS_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Document:
    """One unit of text: a file, a JSON line or a dataset row.

    ``name`` identifies it for the train/validation split and the cache fingerprint, so it does not
    depend on where the corpus lies: a file named directly is its file name, a file found in a directory
    is ``<directory name>/<relative path>``, a JSON line adds ``:<line number>``.
    """

    name: str
    text: str


def load_documents(sources: Optional[Sequence[str]], text_field: str = "text",
                   extensions: Optional[Iterable[str]] = None) -> List[Document]:
    """Read every source in order; None or [] means the default corpus. Raises UserError on bad input."""
    if not sources:
        docs = default_corpus_documents()
    else:
        exts = normalize_extensions(extensions)
        docs = []
        for source in sources:
            docs.extend(_load_source(str(source), text_field, exts))
    if not any(doc.text for doc in docs):
        where = ", ".join(map(str, sources)) if sources else "the default corpus"
        raise UserError(f"no text found in {where} (empty corpus)")
    return [doc for doc in docs if doc.text]


def normalize_extensions(extensions: Optional[Iterable[str]]) -> Optional[set]:
    """{".txt", ".md"} from "txt,md", ["txt", ".md"] or None (no filter)."""
    if extensions is None:
        return None
    if isinstance(extensions, str):
        extensions = extensions.split(",")
    exts = {e.strip().lower() for e in extensions if e.strip()}
    return {e if e.startswith(".") else "." + e for e in exts} or None


def _load_source(source: str, text_field: str, exts: Optional[set]) -> List[Document]:
    if source.startswith("hf:"):
        return load_hf_dataset(source[3:], text_field)
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_directory(path, text_field, exts)
    if path.is_file():
        return _load_file(path, path.name, text_field, must_be_text=True)
    if path.exists():
        raise UserError(f"data source {source} is not a regular file or a directory (a device, FIFO or socket "
                        f"is never read: it may not end)")
    if GLOB_CHARS & set(source):
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True))
        files = [p for p in matches if p.is_file() and (exts is None or p.suffix.lower() in exts)]
        if not files:
            raise UserError(f"no files match {source}")
        return [doc for p in files for doc in _load_file(p, p.as_posix(), text_field, must_be_text=True)]
    raise UserError(f"data source not found: {source}")


def _load_directory(root: Path, text_field: str, exts: Optional[set]) -> List[Document]:
    docs, skipped = [], []
    for path in _walk(root):
        if exts is not None and path.suffix.lower() not in exts:
            continue
        name = f"{root.resolve().name}/{path.relative_to(root).as_posix()}"
        loaded = _load_file(path, name, text_field, must_be_text=False)
        if loaded is None:
            skipped.append(path)
        else:
            docs.extend(loaded)
    if skipped:
        log.warning("skipped %d binary file(s) in %s (first: %s)", len(skipped), root, skipped[0])
    return docs


def _walk(root: Path) -> List[Path]:
    """Non-hidden regular files below ``root``, sorted by path so the order is the same everywhere."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(files, key=lambda p: p.as_posix())


MAX_STREAM_BYTES = 256 << 20


def read_stream_text(stream, what: str = "standard input") -> str:
    """Text read from a stream (standard input), at most MAX_STREAM_BYTES: a UserError past that, so an
    endless stream (``< /dev/zero``) ends in a message instead of exhausting memory."""
    data = stream.buffer.read(MAX_STREAM_BYTES + 1) if hasattr(stream, "buffer") else stream.read(MAX_STREAM_BYTES + 1)
    if len(data) > MAX_STREAM_BYTES:
        raise UserError(f"{what} holds more than {MAX_STREAM_BYTES >> 20} MiB; pass a file instead")
    return decode_text(data, Path(what)) if isinstance(data, bytes) else data


def read_text_file(path: str | Path) -> str:
    """A text file's contents (see :func:`decode_text`); a UserError when unreadable or binary."""
    text = _read_text(Path(path), must_be_text=True)
    assert text is not None
    return text


def _read_text(path: Path, must_be_text: bool) -> Optional[str]:
    if path.exists() and not path.is_file():  # /dev/zero, a FIFO: reading could never end
        raise UserError(f"{path} is not a regular file (a device, FIFO or socket is never read)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if b"\0" in data[:BINARY_PROBE]:
        if must_be_text:
            raise UserError(f"{path} looks like a binary file (NUL bytes), not text")
        return None
    return decode_text(data, path)


def _load_file(path: Path, name: str, text_field: str, must_be_text: bool) -> Optional[List[Document]]:
    """A file's documents; a binary file is an error when named directly, else None (skipped)."""
    text = _read_text(path, must_be_text)
    if text is None:
        return None
    if path.suffix.lower() == ".jsonl":
        return parse_jsonl(text, path, text_field, name)
    return [Document(name, text)]


def decode_text(data: bytes, path: Path) -> str:
    """UTF-8 (a leading BOM dropped); invalid bytes become U+FFFD and a one-line warning names the file."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        log.warning("%s: invalid UTF-8 at byte %d, decoded with replacement characters", path, exc.start)
        return data.decode("utf-8-sig", errors="replace")


def parse_jsonl(text: str, path: Path, text_field: str, name: Optional[str] = None) -> List[Document]:
    """One document per non-blank line, from the string under ``text_field``."""
    docs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or text_field not in row:
            raise UserError(f"{path}:{lineno}: no {text_field!r} field (name the field with train.text_field, "
                            f"or --text-field for `custom-llm tokenizer`)")
        value = row[text_field]
        if not isinstance(value, str):
            raise UserError(f"{path}:{lineno}: field {text_field!r} is {type(value).__name__}, not a string")
        docs.append(Document(f"{name or path.name}:{lineno}", value))
    return docs


def load_hf_dataset(spec: str, text_field: str) -> List[Document]:
    """``NAME[:CONFIG]`` -> the rows of its train split (through the optional ``datasets`` package)."""
    ds = hf_train_split(spec, text_field)
    return [Document(f"hf:{spec}:{i}", text) for i, text in enumerate(ds[text_field]) if isinstance(text, str)]


def hf_train_split(spec: str, column: str) -> Any:
    """The train split of Hugging Face dataset ``NAME[:CONFIG]`` (a local ``save_to_disk`` folder works
    offline), checked to have ``column``; every failure is one UserError naming the dataset."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"hf:{spec} needs the 'datasets' package (pip install datasets)") from None
    name, _, config = spec.partition(":")
    if not name:
        raise UserError("hf: needs a dataset name, as in hf:NAME or hf:NAME:CONFIG")
    try:
        if Path(name).is_dir() and (Path(name) / "dataset_info.json").is_file():
            ds = datasets.load_from_disk(name)
            ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(name, config or None, split="train")
    except Exception as exc:  # datasets raises many unrelated types for a bad name or config
        raise UserError(f"hf:{spec}: cannot load the dataset ({type(exc).__name__}: {exc})") from None
    if column not in ds.column_names:
        raise UserError(f"hf:{spec}: no {column!r} column (columns: {', '.join(ds.column_names)})")
    return ds


def default_corpus_root() -> Path:
    """The running Python's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files(root: Optional[Path] = None) -> List[Path]:
    """Every ``.py`` file of the standard library (test suites included), sorted by relative path.

    On CPython 3.11: 1758 files, 31.5 MB (12 MB outside the test suites). Left out: site-packages,
    __pycache__ and hidden folders.
    """
    root = Path(root) if root is not None else default_corpus_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in DEFAULT_CORPUS_SKIP_DIRS and not d.startswith(".")]
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def default_corpus_documents(root: Optional[Path] = None) -> List[Document]:
    """The default corpus, named ``stdlib/<relative path>``.

    Files that are not valid UTF-8 text (test inputs that are broken on purpose) are skipped silently.
    """
    root = Path(root) if root is not None else default_corpus_root()
    docs = []
    for path in default_corpus_files(root):
        try:
            data = path.read_bytes()
            if b"\0" in data:
                continue
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        docs.append(Document("stdlib/" + path.relative_to(root).as_posix(), text))
    if not docs:
        raise UserError(f"the default corpus is empty: no Python sources under {root}")
    return docs
