"""The shared export on fixed weights: run it in one process and under torchrun, compare time and bytes.

    python3 bench/export_ranks.py [checkpoint]                                   # 1 process
    torchrun --standalone --nproc_per_node=2 bench/export_ranks.py [checkpoint]  # 2 gloo ranks

Weights: the "model" of a train_gpt checkpoint (logs/<RUN_ID>.ckpt: CHECKPOINT_EVERY_SECONDS), else the
seeded init. Every rank builds the same Hessians from the same GPTQ_CALIB_BATCHES training batches (rank 0's
stream, summed locally), so the weights and Hessians are identical whatever the world size; then export_artifact
runs as in train_gpt (QUANT_FIT, BUDGET_BYTES, ... apply) and rank 0 prints `bench_export world:<n> time_ms:<ms>
bytes:<n> sha256:<hex>`; with BENCH_LEGACY=1 the same for the pre-sharing path (quantize_model + pack_artifact in
one process, codecs one after the other) and, with BENCH_EVAL=1, the full-depth roundtrip bpb of the file
(final_roundtrip line).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import sentencepiece
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402


class LocalSums:
    """collect_hessians' view of a runtime that keeps each rank's own sums (every rank sees the same batches)."""
    def __init__(self, rt: tg.Runtime):
        self.device, self.rank = rt.device, 0

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor


def main() -> None:
    cfg = tg.Config.from_env(os.environ)
    rt = tg.Runtime(cfg, os.environ)
    cfg = rt.cfg
    model = tg.build_model(cfg, rt)
    if len(sys.argv) > 1:
        model.load_state_dict(torch.load(sys.argv[1], map_location=rt.device, weights_only=True)["model"])
    batches = tg.TrainBatches(tg.TokenStream(tg.shard_paths(cfg.data_path, "train")), 0, 1,
                              tg.local_batch_tokens(cfg, 1), cfg.train_seq_len, rt.device)
    hessians = tg.collect_hessians(LocalSums(rt), model, [batches.next()[0] for _ in range(cfg.gptq_calib_batches)])
    rt.barrier()
    start = time.perf_counter()
    blob, sizes, fallbacks = tg.export_artifact(cfg, rt, model, hessians, model.recurrent_matrices(),
                                                len(Path(tg.__file__).read_bytes()))
    rt.log(f"bench_export world:{rt.world_size} time_ms:{1000 * (time.perf_counter() - start):.0f} "
           f"bytes:{len(blob)} sha256:{hashlib.sha256(blob).hexdigest()} fallbacks:{fallbacks}")
    if os.environ.get("BENCH_LEGACY") == "1" and rt.is_main:  # the pre-sharing path: one rank, codecs in turn
        start = time.perf_counter()
        legacy, _ = tg.pack_artifact(cfg, tg.quantize_model(cfg, model, hessians, model.recurrent_matrices())[0])
        rt.log(f"bench_export_legacy time_ms:{1000 * (time.perf_counter() - start):.0f} bytes:{len(legacy)} "
               f"sha256:{hashlib.sha256(legacy).hexdigest()}")
    if os.environ.get("BENCH_EVAL") == "1" and rt.is_main:
        _, stored = tg.unpack_artifact(blob)
        fresh = tg.meta_model(cfg)
        state = {n: torch.zeros(fresh.get_parameter(n).shape) for n in fresh.unexported()}
        fresh.load_state_dict({**state, **{t.name: t.dequantize() for t in stored}}, strict=True, assign=True)
        tables = tg.build_byte_tables(sentencepiece.SentencePieceProcessor(model_file=cfg.tokenizer_path),
                                      cfg.vocab_size)
        tg.final_block_eval(cfg, rt, "final_roundtrip", fresh, tg.load_val_tokens(cfg), tables)
    rt.shutdown(0)


if __name__ == "__main__":
    main()
