"""Unigram baselines for a dataset's validation split, in the same bits-per-byte as train_gpt.py reports.

    python3 bench/unigram_bpb.py [DATA_PATH [TOKENIZER_PATH [VAL_MAX_TOKENS]]]   (defaults: the demo dataset)

Prints two lines: a unigram fitted on the train shards (add-half smoothing), the honest baseline a trained model
must beat, and the val split's own unigram entropy (an oracle that has seen the val counts). Every val target is
scored (the first VAL_MAX_TOKENS of them when given, as train_gpt.py caps them), with bytes counted by
train_gpt's tables.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import sentencepiece
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt  # noqa: E402


def main() -> None:
    data_path = sys.argv[1] if len(sys.argv) > 1 else "./data/datasets/demo_sp1024"
    tokenizer_path = sys.argv[2] if len(sys.argv) > 2 else "./data/tokenizers/demo_1024_bpe.model"
    sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_path)
    vocab = sp.vocab_size()
    tables = train_gpt.build_byte_tables(sp, vocab)
    train_counts = np.zeros(vocab, dtype=np.float64)
    for path in train_gpt.shard_paths(data_path, "train"):
        train_counts += np.bincount(train_gpt.read_shard(path), minlength=vocab)
    val = np.concatenate([train_gpt.read_shard(p) for p in train_gpt.shard_paths(data_path, "val")]).astype(np.int64)
    if len(sys.argv) > 3:
        val = val[:int(sys.argv[3]) + 1]
    prev, target = torch.from_numpy(val[:-1]), torch.from_numpy(val[1:])
    nbytes = train_gpt.target_bytes(prev, target, tables).sum().item()
    val_counts = np.bincount(val[1:], minlength=vocab).astype(np.float64)
    fitted = (train_counts + 0.5) / (train_counts.sum() + 0.5 * vocab)
    oracle = val_counts / val_counts.sum()
    for name, probs in (("train_fitted", fitted), ("val_oracle", oracle)):
        nll = -(val_counts[val_counts > 0] * np.log(probs[val_counts > 0])).sum()
        print(f"unigram:{name} val_tokens:{len(target)} val_bytes:{nbytes} "
              f"val_loss:{nll / len(target):.6f} val_bpb:{nll / (math.log(2) * nbytes):.6f}")


if __name__ == "__main__":
    main()
