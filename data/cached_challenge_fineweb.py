#!/usr/bin/env python3
"""Download the challenge's pre-tokenized FineWeb shards from the Hugging Face Hub.

    python3 data/cached_challenge_fineweb.py                      # sp1024, 80 train shards
    python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 10
    python3 data/cached_challenge_fineweb.py 10                   # same, positional count
    python3 data/cached_challenge_fineweb.py --variant byte260 --with-docs

Environment:
    MATCHED_FINEWEB_REPO_ID             dataset repo (default willdepueoai/parameter-golf)
    MATCHED_FINEWEB_REMOTE_ROOT_PREFIX  folder inside the repo (default "datasets")

Remote layout (paths inside the dataset repo, ``<prefix>`` = remote root prefix)
and where each file lands locally (``data/`` = this script's directory)::

    <prefix>/manifest.json                            -> data/manifest.json
    <prefix>/docs_selected.jsonl                      -> data/docs_selected.jsonl (--with-docs)
    <prefix>/docs_selected.source_manifest.json       -> data/docs_selected.source_manifest.json
    <prefix>/datasets/fineweb10B_<variant>/fineweb_val_NNNNNN.bin
    <prefix>/datasets/fineweb10B_<variant>/fineweb_train_NNNNNN.bin
                                                      -> data/datasets/fineweb10B_<variant>/
    <prefix>/<tokenizer path from the manifest>       -> data/tokenizers/<file name>

Manifest schema (only the fields used here; unknown fields are ignored)::

    {
      "datasets": [
        {"name": "fineweb10B_sp1024",
         "tokenizer_name": "sp_bpe_1024",             # or an inline "tokenizer": {...}
         "stats": {"files_train": 80, "files_val": 1, ...}}
      ],
      "tokenizers": [
        {"name": "sp_bpe_1024",
         "model_path": "tokenizers/fineweb_1024_bpe.model",
         "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}   # and/or "path"
      ]
    }

``datasets`` / ``tokenizers`` may also be objects keyed by name, and
``files_train`` / ``files_val`` may sit directly in the dataset entry.
Tokenizer paths are relative to ``<prefix>``; an empty prefix means the repo root.

The local ``data/manifest.json`` is a copy of the remote one with an added
``"_downloaded_from": {"repo_id", "remote_root_prefix"}`` entry; it is reused on
later runs unless it came from a different repo/prefix, in which case it is
fetched again.  Other files are hard-linked from the Hugging Face cache (copied
if linking fails) and skipped when already present: shards must additionally
have a valid header whose token count matches the file size, so truncated
shards are fetched again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent
DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_ROOT_PREFIX = "datasets"
DEFAULT_TRAIN_SHARDS = 80

SHARD_MAGIC = 20240520
SHARD_HEADER_BYTES = 256 * 4

# The hub download function, called as hub_download(repo_id=..., repo_type="dataset",
# filename=...) and returning a local file path.  None means huggingface_hub's
# hf_hub_download (imported lazily).  Tests replace it with a stand-in that
# serves files from a local directory.
hub_download: Callable[..., str] | None = None

_VARIANT_RE = re.compile(r"^(sp[1-9][0-9]*|byte260)$")


class DownloadError(Exception):
    """A problem the user can fix (bad arguments, manifest mismatch, ...)."""


def dataset_name(variant: str) -> str:
    """``sp1024`` -> ``fineweb10B_sp1024``; accepts ``sp<N>`` and ``byte260``."""
    if not _VARIANT_RE.match(variant):
        raise DownloadError(f"unsupported variant {variant!r}: expected sp<VOCAB_SIZE> or byte260")
    return f"fineweb10B_{variant}"


def _default_hub_download(**kwargs) -> str:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise DownloadError("huggingface_hub is required: pip install huggingface_hub") from exc
    return hf_hub_download(**kwargs)


def _shard_is_complete(path: Path) -> bool:
    """True if ``path`` has a valid shard header and exactly the size it announces."""
    try:
        with open(path, "rb") as f:
            header = f.read(12)
        size = path.stat().st_size
    except OSError:
        return False
    if len(header) < 12:
        return False
    magic, _version, n_tokens = (int.from_bytes(header[i : i + 4], "little", signed=True) for i in (0, 4, 8))
    return magic == SHARD_MAGIC and size == SHARD_HEADER_BYTES + 2 * n_tokens


def _is_present(path: Path) -> bool:
    if path.suffix == ".bin":
        return _shard_is_complete(path)
    return path.is_file() and path.stat().st_size > 0


def _entries_by_name(container) -> dict[str, dict]:
    """Accept either a list of {"name": ...} objects or an object keyed by name."""
    if isinstance(container, dict):
        return {str(k): {"name": k, **v} for k, v in container.items() if isinstance(v, dict)}
    if isinstance(container, list):
        return {str(e["name"]): e for e in container if isinstance(e, dict) and "name" in e}
    return {}


class Fetcher:
    """Downloads files of one hub repo into a local data directory."""

    def __init__(self, repo_id: str, remote_prefix: str, root: Path, download: Callable[..., str]):
        self.repo_id = repo_id
        self.remote_prefix = remote_prefix.strip("/")
        self.root = root
        self.download = download
        self.counts = {"fetched": 0, "skipped": 0}

    def remote(self, relative: str) -> str:
        """Path inside the repo for a path relative to the remote root prefix."""
        relative = relative.lstrip("/")
        return f"{self.remote_prefix}/{relative}" if self.remote_prefix else relative

    def cached(self, remote_path: str) -> Path:
        """Fetch ``remote_path`` into the hub cache and return the real file."""
        try:
            path = self.download(repo_id=self.repo_id, repo_type="dataset", filename=remote_path)
        except DownloadError:
            raise
        except Exception as exc:  # hub errors (missing file, network, auth) vary by version
            raise DownloadError(f"could not download {remote_path} from {self.repo_id}: {exc}") from exc
        # Hub cache entries are symlinks into a blob store; link to the blob itself
        # so the local file stays valid whatever happens to the snapshot symlink.
        return Path(path).resolve(strict=True)

    def get(self, remote_path: str, dest: Path) -> None:
        if _is_present(dest):
            self.counts["skipped"] += 1
            print(f"present  {dest.relative_to(self.root)}")
            return
        source = self.cached(remote_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".partial")
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
            how = "linked "
        except OSError:  # e.g. cache on another filesystem
            shutil.copyfile(source, tmp)
            how = "copied "
        os.replace(tmp, dest)
        self.counts["fetched"] += 1
        print(f"{how}  {dest.relative_to(self.root)}")


def load_manifest(fetcher: Fetcher, *, skip_download: bool) -> dict:
    """Return the manifest, reusing ``data/manifest.json`` when it is from this repo."""
    local = fetcher.root / "manifest.json"
    source = {"repo_id": fetcher.repo_id, "remote_root_prefix": fetcher.remote_prefix}
    manifest = None
    if local.is_file():
        try:
            manifest = json.loads(local.read_text(encoding="utf-8"))
        except ValueError:
            manifest = None  # corrupt local copy: fetch again below
    if manifest is not None and manifest.get("_downloaded_from") == source:
        return manifest
    if skip_download:
        if manifest is None:
            raise DownloadError(f"--skip-manifest given but no usable manifest at {local}")
        print(
            f"warning: {local} was downloaded from {manifest.get('_downloaded_from')}, "
            f"not {source}; using it anyway (--skip-manifest)",
            file=sys.stderr,
        )
        return manifest
    remote = fetcher.remote("manifest.json")
    manifest = json.loads(fetcher.cached(remote).read_text(encoding="utf-8"))
    if not isinstance(manifest, dict):
        raise DownloadError(f"{remote} in {fetcher.repo_id} is not a JSON object")
    manifest["_downloaded_from"] = source
    # Written as a fresh file (never a hard link) because it is modified, and
    # writing through a link would corrupt the hub cache.
    fetcher.root.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(local.name + ".partial")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, local)
    print(f"fetched  manifest.json from {fetcher.repo_id}")
    return manifest


def resolve_dataset(manifest: dict, name: str) -> tuple[int, int, list[str]]:
    """Return ``(files_train, files_val, tokenizer_paths)`` for dataset ``name``."""
    datasets = _entries_by_name(manifest.get("datasets"))
    entry = datasets.get(name)
    if entry is None:
        raise DownloadError(f"dataset {name} not in manifest (available: {sorted(datasets) or 'none'})")
    stats = entry.get("stats") if isinstance(entry.get("stats"), dict) else {}
    counts = []
    for key in ("files_train", "files_val"):
        value = stats.get(key, entry.get(key))
        if value is None:
            raise DownloadError(f"manifest entry for {name} has no {key} count")
        counts.append(int(value))

    tokenizer = entry.get("tokenizer")
    if not isinstance(tokenizer, dict):
        tok_name = entry.get("tokenizer_name") or tokenizer
        tokenizers = _entries_by_name(manifest.get("tokenizers"))
        tokenizer = tokenizers.get(str(tok_name)) if tok_name else None
        if tokenizer is None:
            raise DownloadError(f"tokenizer {tok_name!r} of {name} not found in manifest")
    paths = []
    for key in ("model_path", "vocab_path", "path"):
        value = tokenizer.get(key)
        if isinstance(value, str) and value and value not in paths:
            paths.append(value)
    if not paths:
        raise DownloadError(f"tokenizer entry for {name} lists no files: {tokenizer}")
    return counts[0], counts[1], paths


def download(
    variant: str = "sp1024",
    train_shards: int = DEFAULT_TRAIN_SHARDS,
    *,
    with_docs: bool = False,
    skip_manifest: bool = False,
    repo_id: str | None = None,
    remote_prefix: str | None = None,
    root: Path = ROOT,
    download_fn: Callable[..., str] | None = None,
) -> dict:
    """Fetch manifest, (docs,) val shards, the first ``train_shards`` train shards
    and the tokenizer files.  Returns ``{"fetched": n, "skipped": n}``.

    ``repo_id`` / ``remote_prefix`` default to the environment variables (read at
    call time); ``download_fn`` defaults to the module's ``hub_download``.
    """
    name = dataset_name(variant)
    if train_shards < 0:
        raise DownloadError("the number of train shards must be >= 0")
    repo_id = repo_id or os.environ.get("MATCHED_FINEWEB_REPO_ID") or DEFAULT_REPO_ID
    if remote_prefix is None:
        remote_prefix = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_REMOTE_ROOT_PREFIX)
    fetcher = Fetcher(repo_id, remote_prefix, Path(root), download_fn or hub_download or _default_hub_download)

    manifest = load_manifest(fetcher, skip_download=skip_manifest)
    files_train, files_val, tokenizer_paths = resolve_dataset(manifest, name)
    if train_shards > files_train:
        raise DownloadError(
            f"{name} has only {files_train} train shards in {repo_id}; {train_shards} requested"
        )

    if with_docs:
        for fname in ("docs_selected.jsonl", "docs_selected.source_manifest.json"):
            fetcher.get(fetcher.remote(fname), fetcher.root / fname)
    shard_dir = fetcher.root / "datasets" / name
    for split, count in (("val", files_val), ("train", train_shards)):
        for i in range(count):
            fname = f"fineweb_{split}_{i:06d}.bin"
            fetcher.get(fetcher.remote(f"datasets/{name}/{fname}"), shard_dir / fname)
    for path in tokenizer_paths:
        fetcher.get(fetcher.remote(path), fetcher.root / "tokenizers" / Path(path).name)
    return fetcher.counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Download challenge FineWeb shards and tokenizers from the Hugging Face Hub "
        "into data/datasets/ and data/tokenizers/.",
    )
    p.add_argument(
        "train_shards_pos", nargs="?", type=int, metavar="N",
        help="number of train shards (same as --train-shards)",
    )
    p.add_argument(
        "--train-shards", type=int, default=None, metavar="N",
        help=f"number of train shards to fetch, from 000000 (default {DEFAULT_TRAIN_SHARDS})",
    )
    p.add_argument("--variant", default="sp1024", help="sp<VOCAB_SIZE> (default sp1024) or byte260")
    p.add_argument(
        "--skip-manifest", action="store_true",
        help="do not download manifest.json; use the existing data/manifest.json",
    )
    p.add_argument(
        "--with-docs", action="store_true",
        help="also fetch docs_selected.jsonl and docs_selected.source_manifest.json "
        "(the raw documents, for retraining tokenizers)",
    )
    return p


def main(argv: list[str] | None = None, *, root: Path = ROOT, download_fn: Callable[..., str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    n_pos, n_opt = args.train_shards_pos, args.train_shards
    if n_pos is not None and n_opt is not None and n_pos != n_opt:
        print(f"error: positional N={n_pos} conflicts with --train-shards {n_opt}", file=sys.stderr)
        return 2
    n = next((v for v in (n_pos, n_opt) if v is not None), DEFAULT_TRAIN_SHARDS)
    try:
        counts = download(
            args.variant, n,
            with_docs=args.with_docs,
            skip_manifest=args.skip_manifest,
            root=root,
            download_fn=download_fn,
        )
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"done: {counts['fetched']} file(s) fetched, {counts['skipped']} already present")
    return 0


if __name__ == "__main__":
    sys.exit(main())
