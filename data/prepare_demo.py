#!/usr/bin/env python3
"""Build the offline demo dataset from the bundled State of the Union corpus.

    python3 data/prepare_demo.py                 # -> data/tokenizers/demo_1024_bpe.model
                                                 #    data/datasets/demo_sp1024/
    python3 data/prepare_demo.py --output-root /tmp/demo
    python3 data/prepare_demo.py --force         # rebuild even if up to date

Input is ``sotu_1790_2021.jsonl.xz`` next to this script (233 addresses,
1790-2021, chronological).  The last 14 addresses (2008-2021) are the
validation split; the tokenizer (vocab 1024, challenge settings) is trained on
the other 219.

Idempotent: if the dataset's manifest.json shows it was built by the current
builder with the same settings from a corpus with the same sha256, and the
tokenizer and all shards it lists are present and intact, the build is skipped
(use ``--force`` to rebuild).  Otherwise everything is rebuilt from scratch.
Paths are resolved relative to this file, so it works from any directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import build_dataset as bd  # noqa: E402  (needs the sys.path entry above)

CORPUS = HERE / "sotu_1790_2021.jsonl.xz"
NAME = "demo"
VOCAB_SIZE = 1024
VAL_DOCS = 14  # the 2008-2021 addresses


def _settings() -> dict:
    """The build settings recorded in (and compared against) the manifest."""
    return {
        "vocab_size": VOCAB_SIZE,
        "val_docs": VAL_DOCS,
        "shard_tokens": bd.DEFAULT_SHARD_TOKENS,
        "seed": bd.DEFAULT_SEED,
        # train_gpt.py reads shards in order and a CPU demo sees only part of them: chronological training
        # documents would mean training on the 1790s alone. Shuffled, like the challenge's document stream.
        "shuffle_train": True,
        "reuse_tokenizer": None,
        "txt_separator": bd.TXT_BLANK,  # recorded by the builder; the demo corpus is JSONL, so it does not act
    }


def existing_manifest_if_current(output_root: Path) -> dict | None:
    """Return the existing manifest if the outputs are complete and up to date."""
    ds_dir = bd.dataset_dir(output_root, NAME, VOCAB_SIZE)
    try:
        manifest = json.loads((ds_dir / "manifest.json").read_text(encoding="utf-8"))
        model = output_root / manifest["tokenizer"]["model_path"]
        current = (
            manifest.get("builder_version") == bd.BUILDER_VERSION
            and manifest.get("settings") == _settings()
            and [s["sha256"] for s in manifest["sources"]] == [bd.sha256_file(CORPUS)]
            and bd.sha256_file(model) == manifest["tokenizer"]["model_sha256"]
        )
        if not current:
            return None
        for split in ("train", "val"):
            tokens = sum(bd.read_shard(ds_dir / f).size for f in manifest["files"][split])
            if tokens != manifest["stats"][f"tokens_{split}"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        # Missing or malformed outputs simply mean "rebuild".
        return None
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--output-root", type=Path, default=HERE,
        help=f"where tokenizers/ and datasets/ go (default: {HERE})",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if outputs are up to date")
    args = p.parse_args(argv)
    output_root = args.output_root.resolve()

    t0 = time.perf_counter()
    manifest = None if args.force else existing_manifest_if_current(output_root)
    if manifest is not None:
        action = "up to date, skipped rebuild (use --force to rebuild)"
    else:
        settings = _settings()
        manifest = bd.build(
            [CORPUS],
            name=NAME,
            val_docs=settings["val_docs"],
            output_root=output_root,
            vocab_size=settings["vocab_size"],
            shard_tokens=settings["shard_tokens"],
            seed=settings["seed"],
            shuffle_train=settings["shuffle_train"],
        )
        action = "built"
    s = manifest["stats"]
    print(f"demo dataset {action}")
    print(f"  tokenizer: {output_root / manifest['tokenizer']['model_path']}")
    print(f"  dataset:   {bd.dataset_dir(output_root, NAME, VOCAB_SIZE)}")
    print(f"  train: {s['docs_train']} docs, {s['tokens_train']:,} tokens, {s['files_train']} shard(s)")
    print(f"  val:   {s['docs_val']} docs, {s['tokens_val']:,} tokens, {s['files_val']} shard(s)")
    print(f"  time:  {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
