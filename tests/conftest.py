"""Shared fixtures: tiny configs, real challenge shards and a real SentencePiece model from the demo corpus."""

from __future__ import annotations

import json
import lzma
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "data"))

import build_dataset  # noqa: E402  (data/build_dataset.py)
import train_gpt  # noqa: E402

DEMO_CORPUS = REPO / "data" / "sotu_1790_2021.jsonl.xz"
TINY_VOCAB = 512


def tiny_config(**overrides) -> train_gpt.Config:
    """A 3x4 recurrent model small enough for CPU unit tests (dim 32, 4 heads, 2 kv heads)."""
    base = dict(vocab_size=TINY_VOCAB, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2.0, train_seq_len=16,
                train_batch_tokens=64, val_batch_size=64, iterations=8, max_wallclock_seconds=0.0,
                warmdown_iters=4, lr_warmup_steps=2, swa_every=2, val_loss_every=0, compile="0")
    base.update(overrides)
    return train_gpt.Config(**base)


@pytest.fixture
def tiny_cfg():
    return tiny_config


@pytest.fixture(scope="session")
def demo_subset(tmp_path_factory) -> dict:
    """Tokenizer (vocab 512) + train/val shards built by data/build_dataset.py from 24 demo addresses.

    Returns {"data_path", "tokenizer_path", "vocab_size", "val_texts"}; val = the last 3 of those addresses.
    """
    root = tmp_path_factory.mktemp("demo_subset")
    with lzma.open(DEMO_CORPUS, "rt", encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh][-24:]
    corpus = root / "subset.jsonl"
    corpus.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    build_dataset.build([corpus], name="subset", val_docs=3, output_root=root, vocab_size=TINY_VOCAB,
                        log=lambda *a, **k: None)
    return {
        "data_path": str(build_dataset.dataset_dir(root, "subset", TINY_VOCAB)),
        "tokenizer_path": str(build_dataset.tokenizer_path(root, "subset", TINY_VOCAB)),
        "vocab_size": TINY_VOCAB,
        "val_texts": [d["text"] for d in docs[-3:]],
    }
