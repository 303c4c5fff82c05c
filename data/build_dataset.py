#!/usr/bin/env python3
"""Turn a text corpus into a SentencePiece BPE tokenizer plus challenge-format shards.

The output mirrors the layout used by the Parameter Golf challenge, so
``train_gpt.py`` can train on any corpus exactly as it trains on FineWeb::

    <output-root>/tokenizers/<name>_<vocab>_bpe.model   (+ .vocab)
    <output-root>/datasets/<name>_sp<vocab>/fineweb_train_000000.bin ...
    <output-root>/datasets/<name>_sp<vocab>/fineweb_val_000000.bin ...
    <output-root>/datasets/<name>_sp<vocab>/manifest.json

Input files (one or more, read in the order given; ``.gz`` / ``.xz`` / ``.zst``
compression is recognised by suffix):

* ``*.jsonl``: one JSON object per line; its ``"text"`` string is one document.
  Blank lines are ignored.
* ``*.txt``: by default documents are separated by one or more blank
  (whitespace-only) lines; line breaks inside a document are kept.  When a
  document has blank lines of its own (e-mails, multi-paragraph articles), pass
  ``--txt-separator LINE`` (a line whose stripped text is LINE ends a document;
  blank lines inside are kept) or ``--txt-separator file`` (each file is one
  document), or use JSONL.

Documents whose text is empty or whitespace-only are skipped.  The LAST
``--val-docs`` documents (in input order) form the validation split; all earlier
documents form the training split.  The tokenizer is trained on the training
split only, so validation text never influences the vocabulary.

Shard format (identical to the challenge): a header of 256 little-endian int32
(``[20240520, 1, n_tokens, 0, ...]``) followed by ``n_tokens`` little-endian
uint16 token ids.  Every document is written as BOS (id 1) followed by its
tokens, no EOS.  Training documents are concatenated and cut into shards of
``--shard-tokens`` tokens, so a document may span two train shards; validation
shards hold only validation documents.

Example::

    python3 data/build_dataset.py corpus.jsonl.xz --name mycorpus --val-docs 100

At the end it prints the train_gpt.py command that trains on what it built.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_VOCAB = 1 << 16  # token ids are stored as uint16

DEFAULT_VOCAB_SIZE = 1024
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_SEED = 1337

# SentencePiece silently drops training "sentences" longer than
# max_sentence_length (4192 bytes by default).  Lines are cut to half of that so
# that even text which NFKC normalisation expands still fits.
MAX_TOKENIZER_LINE_BYTES = 2048

# Upper bound on the number of lines SentencePiece loads for training.  Larger
# corpora are subsampled by SentencePiece's (seeded) reservoir sampler; this
# keeps memory and time bounded on big inputs and has no effect on small ones.
MAX_TOKENIZER_SENTENCES = 5_000_000

# The thread count is recorded inside the .model file's trainer spec, so it is
# fixed (rather than os.cpu_count()) to make the model bytes reproducible across
# machines.  The learned pieces do not depend on it.
TOKENIZER_TRAIN_THREADS = 2

# --txt-separator values with a meaning of their own; any other value is a separator line.
TXT_BLANK, TXT_FILE = "blank", "file"
COMPRESSED = (".gz", ".xz", ".zst")

# Bump when the build logic changes in a way that changes outputs; consumers
# such as prepare_demo.py use it to decide whether existing outputs are stale.
BUILDER_VERSION = 1

# Settings of the challenge's SentencePiece tokenizers.  Everything not listed
# keeps SentencePiece's defaults (e.g. remove_extra_whitespaces=True).
CHALLENGE_SPM_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.999,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
    hard_vocab_limit=False,
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Break points for tokenizer-training lines: any line break, or whitespace that
# follows sentence-final punctuation (optionally followed by a closing quote or
# bracket).  Abbreviations ("Mr. Smith") are split too, which is harmless here:
# the lines only feed piece-frequency statistics.
_LINE_BREAK_RE = re.compile(
    r"\s*\n\s*"
    r"|(?:(?<=[.!?])|(?<=[.!?][\"'\u201d\u2019)\]]))\s+"
)
_WORD_RE = re.compile(r"\S+")


class BuildError(Exception):
    """Invalid input or settings; reported to CLI users without a traceback."""


# --------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------


def shard_header(num_tokens: int) -> np.ndarray:
    """Return the 256-int32 header for a shard holding ``num_tokens`` tokens."""
    if not 0 <= num_tokens < 2**31:
        raise ValueError(f"token count {num_tokens} does not fit the int32 header")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0] = SHARD_MAGIC
    header[1] = SHARD_VERSION
    header[2] = num_tokens
    return header


def write_shard(path: str | os.PathLike, tokens: Sequence[int] | np.ndarray) -> int:
    """Write one shard file (header + uint16 tokens); return the token count.

    Raises ``ValueError`` if any id is outside ``[0, 65535]``.
    """
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError("tokens must be a 1-D sequence")
    if arr.dtype != np.uint16:
        if arr.size and (arr.min() < 0 or arr.max() >= MAX_VOCAB):
            raise ValueError("token id outside the uint16 range")
        arr = arr.astype(np.uint16)
    with open(path, "wb") as f:
        f.write(shard_header(arr.size).tobytes())
        f.write(arr.astype("<u2", copy=False).tobytes())
    return int(arr.size)


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Read a shard written by :func:`write_shard`, validating its header and size."""
    data = Path(path).read_bytes()
    if len(data) < HEADER_BYTES:
        raise ValueError(f"{path}: shorter than the {HEADER_BYTES}-byte header")
    header = np.frombuffer(data, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: bad magic/version {header[0]}/{header[1]}")
    n = int(header[2])
    if len(data) != HEADER_BYTES + 2 * n:
        raise ValueError(f"{path}: header says {n} tokens but file has {len(data)} bytes")
    return np.frombuffer(data, dtype="<u2", offset=HEADER_BYTES).astype(np.uint16)


class ShardWriter:
    """Concatenate token arrays and cut them into fixed-size shards.

    Files are named ``fineweb_<split>_<NNNNNN>.bin`` (zero-based); every shard
    except possibly the last holds exactly ``shard_tokens`` tokens.
    """

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        if not 0 < shard_tokens < 2**31:
            raise ValueError("shard_tokens must be in [1, 2**31 - 1]")
        self.out_dir = Path(out_dir)
        self.split = split
        self.shard_tokens = shard_tokens
        self.files: list[str] = []
        self.total_tokens = 0
        self._pending: list[np.ndarray] = []
        self._pending_len = 0

    def add(self, tokens: np.ndarray) -> None:
        while tokens.size:
            take = min(tokens.size, self.shard_tokens - self._pending_len)
            self._pending.append(tokens[:take])
            self._pending_len += take
            tokens = tokens[take:]
            if self._pending_len == self.shard_tokens:
                self._flush()

    def close(self) -> list[str]:
        """Write the final partial shard (if any) and return all file names."""
        if self._pending_len:
            self._flush()
        return self.files

    def _flush(self) -> None:
        name = f"fineweb_{self.split}_{len(self.files):06d}.bin"
        self.total_tokens += write_shard(self.out_dir / name, np.concatenate(self._pending))
        self.files.append(name)
        self._pending, self._pending_len = [], 0


# --------------------------------------------------------------------------
# Reading documents
# --------------------------------------------------------------------------


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".zst":
        import zstandard

        return zstandard.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def _format_of(path: Path) -> str:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    fmt = suffixes[-1] if suffixes else ""
    if fmt not in (".jsonl", ".txt"):
        raise BuildError(f"{path}: unsupported input (expected .jsonl or .txt, optionally .gz/.xz/.zst)")
    return fmt


def _clean(text: str) -> str:
    # Lone surrogates (possible via JSON "\udXXX" escapes) cannot be encoded as
    # UTF-8 and would crash SentencePiece; replace them with U+FFFD.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


def _iter_jsonl(path: Path) -> Iterator[str]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BuildError(f"{path}:{lineno}: invalid JSON ({exc})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise BuildError(f'{path}:{lineno}: expected an object with a string "text" field')
            yield obj["text"]


def _iter_txt(path: Path, separator: str = TXT_BLANK) -> Iterator[str]:
    """Documents of a text file: split at blank lines (TXT_BLANK), the whole file (TXT_FILE), or at lines whose
    stripped text is ``separator`` (blank lines then stay inside documents; a document's edges are stripped)."""
    lines: list[str] = []
    with _open_text(path) as f:
        for line in f:
            ends_doc = not line.strip() if separator == TXT_BLANK else line.strip() == separator
            if ends_doc and separator != TXT_FILE:
                if lines:
                    yield "\n".join(lines).strip("\n")
                lines = []
            elif line.strip() or separator != TXT_BLANK:
                lines.append(line.rstrip("\r\n"))
    if lines:
        yield "\n".join(lines).strip("\n")


def iter_documents(paths: Iterable[str | os.PathLike], txt_separator: str = TXT_BLANK) -> Iterator[str]:
    """Yield the non-empty documents of ``paths`` in order (see module docstring)."""
    for p in paths:
        path = Path(p)
        if _format_of(path) == ".jsonl":
            docs = _iter_jsonl(path)
        else:
            docs = _iter_txt(path, txt_separator)
        for text in docs:
            if text.strip():
                yield _clean(text)


def count_documents(paths: Sequence[str | os.PathLike], txt_separator: str = TXT_BLANK) -> int:
    """Number of documents :func:`iter_documents` yields (one extra pass)."""
    return sum(1 for _ in iter_documents(paths, txt_separator))


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


def _split_long(line: str, max_bytes: int) -> list[str]:
    """Cut ``line`` into pieces of at most ``max_bytes`` UTF-8 bytes.

    Cuts happen at whitespace; a single word longer than the limit is cut
    between characters.  Only the whitespace at cut points is dropped.
    """
    pieces: list[str] = []
    start = end = nbytes = 0
    open_piece = False
    for m in _WORD_RE.finditer(line):
        word_bytes = len(m.group().encode("utf-8"))
        if open_piece:
            gap = len(line[end : m.start()].encode("utf-8"))
            if nbytes + gap + word_bytes <= max_bytes:
                end, nbytes = m.end(), nbytes + gap + word_bytes
                continue
            pieces.append(line[start:end])
            open_piece = False
        if word_bytes <= max_bytes:
            start, end, nbytes, open_piece = m.start(), m.end(), word_bytes, True
            continue
        chunk, chunk_bytes = [], 0
        for ch in m.group():
            b = len(ch.encode("utf-8"))
            if chunk_bytes + b > max_bytes:
                pieces.append("".join(chunk))
                chunk, chunk_bytes = [], 0
            chunk.append(ch)
            chunk_bytes += b
        pieces.append("".join(chunk))
    if open_piece:
        pieces.append(line[start:end])
    return pieces


def split_for_tokenizer(text: str, max_bytes: int = MAX_TOKENIZER_LINE_BYTES) -> list[str]:
    """Split a document into tokenizer-training lines of at most ``max_bytes`` bytes.

    Splits at line breaks and sentence ends, then cuts any still-too-long
    sentence at whitespace (or, for a giant "word", between characters).
    Returned lines are stripped, non-empty and contain no line breaks; joined
    they contain every non-whitespace character of ``text`` in order.  NUL is
    treated as whitespace because SentencePiece handles C strings internally.
    """
    lines: list[str] = []
    for part in _LINE_BREAK_RE.split(text.replace("\x00", " ")):
        part = part.strip()
        if not part:
            continue
        if len(part.encode("utf-8")) <= max_bytes:
            lines.append(part)
        else:
            lines.extend(_split_long(part, max_bytes))
    return lines


def _write_vocab_file(sp, path: Path) -> None:
    # Same "piece<TAB>score" format SentencePiece itself writes next to a model.
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for i in range(sp.get_piece_size()):
            f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def train_tokenizer(
    lines: Iterable[str],
    model_path: str | os.PathLike,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    seed: int = DEFAULT_SEED,
    max_sentences: int = MAX_TOKENIZER_SENTENCES,
):
    """Train a challenge-style SentencePiece BPE model on ``lines``.

    ``lines`` should already be split with :func:`split_for_tokenizer`.  Writes
    ``model_path`` (``.model``) and the matching ``.vocab`` file and returns the
    loaded ``SentencePieceProcessor``.  The result is deterministic for the
    same lines and arguments: the model is serialised in memory (so the output
    path is not recorded in it), the thread count is fixed, and ``seed`` seeds
    SentencePiece's sentence sampler (only used when there are more than
    ``max_sentences`` lines).
    """
    import sentencepiece as spm

    if not 0 < vocab_size <= MAX_VOCAB:
        raise BuildError(f"vocab_size must be in [1, {MAX_VOCAB}] so ids fit in uint16")
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=vocab_size,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=TOKENIZER_TRAIN_THREADS,
        minloglevel=1,  # keep SentencePiece's warnings, drop its progress chatter
        **CHALLENGE_SPM_SETTINGS,
    )
    _atomic_write_bytes(model_path, buf.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    _write_vocab_file(sp, model_path.with_suffix(".vocab"))
    return sp


def load_tokenizer(model_path: str | os.PathLike):
    """Load a SentencePiece model and check it can produce challenge shards."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    if sp.vocab_size() > MAX_VOCAB:
        raise BuildError(f"{model_path}: vocab size {sp.vocab_size()} does not fit in uint16")
    if sp.bos_id() < 0:
        raise BuildError(f"{model_path}: tokenizer has no BOS piece")
    return sp


def encode_documents(sp, documents: Iterable[str], batch_size: int = 256) -> Iterator[np.ndarray]:
    """Yield one uint16 array per document: BOS followed by the document's tokens."""
    threads = os.cpu_count() or 1
    bos = np.array([sp.bos_id()], dtype=np.uint16)
    batch: list[str] = []

    def flush() -> Iterator[np.ndarray]:
        for ids in sp.encode(batch, out_type=int, num_threads=threads):
            yield np.concatenate([bos, np.asarray(ids, dtype=np.uint16)])
        batch.clear()

    for doc in documents:
        batch.append(doc)
        if len(batch) == batch_size:
            yield from flush()
    if batch:
        yield from flush()


# --------------------------------------------------------------------------
# Whole build
# --------------------------------------------------------------------------


def tokenizer_path(output_root: str | os.PathLike, name: str, vocab_size: int) -> Path:
    return Path(output_root) / "tokenizers" / f"{name}_{vocab_size}_bpe.model"


def dataset_dir(output_root: str | os.PathLike, name: str, vocab_size: int) -> Path:
    return Path(output_root) / "datasets" / f"{name}_sp{vocab_size}"


def build(
    inputs: Sequence[str | os.PathLike],
    *,
    name: str,
    val_docs: int,
    output_root: str | os.PathLike = "data",
    vocab_size: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    reuse_tokenizer: str | os.PathLike | None = None,
    seed: int = DEFAULT_SEED,
    shuffle_train: bool = False,
    txt_separator: str = TXT_BLANK,
    log=print,
) -> dict:
    """Build tokenizer + shards + manifest; return the manifest dict.

    ``vocab_size`` defaults to 1024 (or to the reused tokenizer's size).  The
    dataset directory is written to a temporary sibling and swapped in at the
    end, so an interrupted build never leaves a half-written dataset and stale
    shards from an earlier, larger build never survive.

    ``shuffle_train`` writes the training documents in an order drawn from
    ``seed`` (the challenge's shards are a shuffled document stream, and
    train_gpt.py reads shards sequentially); it holds the encoded training
    split in memory. Validation documents always keep their input order.
    ``txt_separator`` says how ``.txt`` inputs split into documents (see the
    module docstring).
    """
    t0 = time.perf_counter()
    if not _NAME_RE.match(name):
        raise BuildError(f"invalid dataset name {name!r} (letters, digits, '_', '.', '-')")
    if not inputs:
        raise BuildError("no input files given")
    inputs = [Path(p) for p in inputs]
    for p in inputs:
        _format_of(p)
        if not p.is_file():
            raise BuildError(f"input file not found: {p}")
    if not 0 < shard_tokens < 2**31:
        raise BuildError("shard_tokens must be in [1, 2**31 - 1]")
    if val_docs < 1:
        raise BuildError("val_docs must be at least 1 (train_gpt.py needs validation data)")

    if not txt_separator:
        raise BuildError("--txt-separator must not be empty")
    total_docs = count_documents(inputs, txt_separator)
    n_train = total_docs - val_docs
    if n_train < 1:
        raise BuildError(f"{total_docs} documents found; need more than val_docs={val_docs}")
    log(f"{total_docs} documents: {n_train} train, {val_docs} val (the last {val_docs})")

    def train_docs() -> Iterator[str]:
        for i, doc in enumerate(iter_documents(inputs, txt_separator)):
            if i >= n_train:
                return
            yield doc

    output_root = Path(output_root)
    if reuse_tokenizer is not None:
        sp = load_tokenizer(reuse_tokenizer)
        if vocab_size is not None and vocab_size != sp.vocab_size():
            raise BuildError(
                f"--vocab-size {vocab_size} conflicts with the reused tokenizer's {sp.vocab_size()}"
            )
        vocab_size = sp.vocab_size()
        model_path = tokenizer_path(output_root, name, vocab_size)
        model_path.parent.mkdir(parents=True, exist_ok=True)
        src = Path(reuse_tokenizer)
        if not (model_path.exists() and os.path.samefile(src, model_path)):
            shutil.copyfile(src, model_path)
            if src.with_suffix(".vocab").is_file():
                shutil.copyfile(src.with_suffix(".vocab"), model_path.with_suffix(".vocab"))
            else:
                _write_vocab_file(sp, model_path.with_suffix(".vocab"))
        log(f"reusing tokenizer {src} -> {model_path}")
    else:
        vocab_size = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
        model_path = tokenizer_path(output_root, name, vocab_size)
        t_tok = time.perf_counter()
        lines = (line for doc in train_docs() for line in split_for_tokenizer(doc))
        sp = train_tokenizer(lines, model_path, vocab_size, seed=seed)
        log(f"trained tokenizer {model_path} in {time.perf_counter() - t_tok:.1f}s")
        if sp.vocab_size() < vocab_size:
            log(f"warning: corpus only supports {sp.vocab_size()} pieces (asked for {vocab_size})")

    final_dir = dataset_dir(output_root, name, vocab_size)
    work_dir = final_dir.with_name(f".{final_dir.name}.partial")
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)

    writers = {s: ShardWriter(work_dir, s, shard_tokens) for s in ("train", "val")}
    docs = {"train": 0, "val": 0}
    held: list[np.ndarray] = []
    for i, toks in enumerate(encode_documents(sp, iter_documents(inputs, txt_separator))):
        split = "train" if i < n_train else "val"
        if split == "train" and shuffle_train:
            held.append(toks)
        else:
            writers[split].add(toks)
        docs[split] += 1
    for j in np.random.default_rng(seed).permutation(len(held)):
        writers["train"].add(held[j])
    files = {s: w.close() for s, w in writers.items()}

    manifest = {
        "builder_version": BUILDER_VERSION,
        "name": name,
        "dataset": final_dir.name,
        "format": {
            "magic": SHARD_MAGIC,
            "version": SHARD_VERSION,
            "header_bytes": HEADER_BYTES,
            "token_dtype": "<u2",
            "bos_per_document": True,
            "eos_per_document": False,
        },
        "settings": {
            "vocab_size": vocab_size,
            "val_docs": val_docs,
            "shard_tokens": shard_tokens,
            "seed": seed,
            "shuffle_train": shuffle_train,
            "txt_separator": txt_separator,
            "reuse_tokenizer": None if reuse_tokenizer is None else str(reuse_tokenizer),
        },
        "tokenizer": {
            # Relative to the output root, like the challenge's manifest paths.
            "model_path": model_path.relative_to(output_root).as_posix(),
            "vocab_path": model_path.with_suffix(".vocab").relative_to(output_root).as_posix(),
            "model_sha256": sha256_file(model_path),
            "vocab_size": int(sp.vocab_size()),
            "bos_id": int(sp.bos_id()),
            "trainer": None if reuse_tokenizer is not None else dict(CHALLENGE_SPM_SETTINGS),
        },
        "sources": [
            {"path": str(p), "name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in inputs
        ],
        "stats": {
            "docs_total": total_docs,
            "docs_train": docs["train"],
            "docs_val": docs["val"],
            "tokens_train": writers["train"].total_tokens,
            "tokens_val": writers["val"].total_tokens,
            "files_train": len(files["train"]),
            "files_val": len(files["val"]),
        },
        "files": files,
    }
    (work_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(work_dir, final_dir)
    s = manifest["stats"]
    log(
        f"wrote {final_dir}: train {s['docs_train']} docs / {s['tokens_train']:,} tokens "
        f"in {s['files_train']} shard(s); val {s['docs_val']} docs / {s['tokens_val']:,} tokens "
        f"in {s['files_val']} shard(s) [{time.perf_counter() - t0:.1f}s]"
    )
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Build a SentencePiece BPE tokenizer and challenge-format train/val shards "
        "from .jsonl / .txt corpora (optionally .gz/.xz/.zst compressed).",
    )
    p.add_argument("inputs", nargs="+", help="input files, read in the order given")
    p.add_argument("--name", required=True, help="dataset name used in output file names")
    p.add_argument(
        "--val-docs", type=int, required=True, metavar="N",
        help="the LAST N documents (in input order) become the validation split",
    )
    p.add_argument("--output-root", default="data", help="output directory (default: data)")
    p.add_argument(
        "--vocab-size", type=int, default=None,
        help=f"tokenizer vocabulary size (default {DEFAULT_VOCAB_SIZE}, max {MAX_VOCAB})",
    )
    p.add_argument(
        "--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
        help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:_})",
    )
    p.add_argument(
        "--reuse-tokenizer", metavar="PATH", default=None,
        help="use this existing SentencePiece .model instead of training one",
    )
    p.add_argument(
        "--seed", type=int, default=DEFAULT_SEED,
        help="seed for SentencePiece's sentence sampling (matters only for corpora above "
        f"{MAX_TOKENIZER_SENTENCES:_} tokenizer lines) and for --shuffle-train",
    )
    p.add_argument(
        "--shuffle-train", action="store_true",
        help="write the training documents in a seeded random order (holds the split in memory)",
    )
    p.add_argument(
        "--txt-separator", default=TXT_BLANK, metavar="LINE",
        help=f"how .txt inputs split into documents: '{TXT_BLANK}' (default: at blank lines), '{TXT_FILE}' "
        "(one document per file) or a separator line, e.g. --txt-separator=--- (blank lines then stay inside documents)",
    )
    return p


def training_command(manifest: dict, output_root: str | os.PathLike) -> str:
    """The train_gpt.py command (8 GPUs) that trains on a build; its runs are recorded as not submissions."""
    root = Path(output_root)
    return (f"DATA_PATH={root / 'datasets' / manifest['dataset']} "
            f"TOKENIZER_PATH={root / manifest['tokenizer']['model_path']} "
            f"VOCAB_SIZE={manifest['tokenizer']['vocab_size']} torchrun --standalone --nproc_per_node=8 train_gpt.py")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = build(
            args.inputs,
            name=args.name,
            val_docs=args.val_docs,
            output_root=args.output_root,
            vocab_size=args.vocab_size,
            shard_tokens=args.shard_tokens,
            reuse_tokenizer=args.reuse_tokenizer,
            seed=args.seed,
            shuffle_train=args.shuffle_train,
            txt_separator=args.txt_separator,
        )
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    command = training_command(manifest, args.output_root)
    print(f"train on it (8 GPUs):  {command}")
    print(f"or on CPU:             PRESET=demo {command.split(' torchrun')[0]} python3 train_gpt.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
