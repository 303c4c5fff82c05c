"""Quantization methods compared on one set of trained demo weights: quant_penalty_bpb, artifact bytes, times.

    python3 data/prepare_demo.py && python3 bench/quant_methods.py

Trains PRESET=demo in one process for BENCH_TRAIN_SECONDS (default 240) with train_gpt's own Trainer and SWA, and
caches the weights and the train-stream position in BENCH_WEIGHTS (default logs/bench_quant_weights.pt; delete it
to retrain). Then, on those weights, for QUANT_METHOD ref, clip, gptq with GPTQ_CALIB=train and selfgen: quantize,
pack with both codecs, read the artifact back into a fresh model and evaluate it at full depth. Also measured: the
same quantized tensors under torch.save + zstd-22, the code layouts (int8 / uint8 offset / bit-packed) per codec,
and DRY_RUN's size estimate. Hessians are collected once per calibration source and reused for every level pair
in BENCH_LEVELS (default "63/16"; e.g. "63/16,15/7"). Train_gpt env knobs apply (GPTQ_CALIB_BATCHES, ...);
BENCH_SELFGEN_BATCHES (default 4) sets the self-generated batches, ~TRAIN_SEQ_LEN/2 forwards each (no KV cache).
"""

from __future__ import annotations

import dataclasses
import io
import os
import sys
import time
from pathlib import Path

import brotli
import numpy as np
import sentencepiece
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402


def codec_sizes(data: bytes) -> dict[str, int]:
    return {"zstd": len(zstandard.ZstdCompressor(level=22).compress(data)),
            "brotli": len(brotli.compress(data, quality=11))}


def train_or_load(cfg: tg.Config, rt: tg.Runtime, val: torch.Tensor, tables: tg.ByteTables,
                  weights: Path) -> tuple[tg.GPT, tg.TrainBatches]:
    """The SWA-averaged demo model and the train stream positioned right after its last training batch."""
    model = tg.build_model(cfg, rt)
    stream = tg.TokenStream(tg.shard_paths(cfg.data_path, "train"))
    batches = tg.TrainBatches(stream, 0, 1, tg.local_batch_tokens(cfg, 1), cfg.train_seq_len, rt.device)
    if weights.exists():
        saved = torch.load(weights, weights_only=True)
        model.load_state_dict(saved["state"])
        stream.file_index, stream.offset = saved["stream"]
        stream.tokens = tg.read_shard(stream.paths[stream.file_index])
        print(f"bench weights:{weights} (cached) train_steps:{saved['steps']}")
        return model, batches
    train_cfg = dataclasses.replace(cfg, max_wallclock_seconds=cfg.max_wallclock_seconds - cfg.gptq_reserve_seconds,
                                    gptq_reserve_seconds=0.0)
    trainer = tg.Trainer(train_cfg, rt, model, model, tg.build_optimizers(model, cfg, fused=False), batches, val,
                         tables)
    state = trainer.run()
    tg.swa_apply(state, model)
    torch.save({"state": model.state_dict(), "stream": (stream.file_index, stream.offset), "steps": state.step},
               weights)
    print(f"bench weights:{weights} (trained) train_steps:{state.step} train_ms:{state.train_ms:.0f}")
    return model, batches


def layout_sizes(stored: list[tg.StoredTensor]) -> None:
    """Compressed bytes of all codes as int8, as uint8 offset by L, and bit-packed to ceil(log2(2L+1)) bits; and of
    the float values and row scales as stored bytes versus byte planes (what pack_artifact writes)."""
    floats = [t.values for t in stored if not t.levels] + [t.scales for t in stored if t.levels]
    for name, data in (("plain", b"".join(a.tobytes() for a in floats)),
                       ("byte_planes", b"".join(a.view(np.uint8).reshape(-1, a.itemsize).T.tobytes() for a in floats))):
        print(f"floats_and_scales layout:{name} raw_bytes:{len(data)} " + " ".join(f"{c}_bytes:{n}" for c, n in
                                                                                 codec_sizes(data).items()))
    quantized = [t for t in stored if t.levels]
    offset = [(t.values.astype(np.int16) + t.levels).astype(np.uint8) for t in quantized]
    bits = [int(np.ceil(np.log2(2 * t.levels + 1))) for t in quantized]
    packed = [np.packbits(np.unpackbits(u[:, None], axis=1)[:, 8 - b:].ravel()) for u, b in zip(offset, bits)]
    for name, arrays in (("int8", [t.values for t in quantized]), ("uint8_offset", offset), ("bitpacked", packed)):
        data = b"".join(a.tobytes() for a in arrays)
        print(f"codes layout:{name} raw_bytes:{len(data)} " + " ".join(f"{c}_bytes:{n}" for c, n in
                                                                        codec_sizes(data).items()))


def torch_save_bytes(stored: list[tg.StoredTensor]) -> int:
    """torch.save of the same codes (int8), row scales (fp16) and float tensors, compressed with zstd-22."""
    tensors = {}
    for t in stored:
        tensors[t.name] = torch.from_numpy(t.values.copy()).view(t.shape if not t.levels else (t.shape[0], -1))
        if t.levels:
            tensors[t.name + ".scale"] = torch.from_numpy(t.scales.copy())
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return codec_sizes(buf.getvalue())["zstd"]


def evaluate(cfg: tg.Config, rt: tg.Runtime, model: tg.GPT, hessians: dict, val: torch.Tensor,
             tables: tg.ByteTables) -> tuple[float, list[tg.StoredTensor], bytes, dict, dict]:
    """Quantize, pack (both codecs), read back into a fresh model, evaluate: (val_bpb, stored, file, sizes, times)."""
    times, start = {}, time.perf_counter()
    stored, fallbacks = tg.quantize_model(cfg, model, hessians)
    times["quant_s"], start = time.perf_counter() - start, time.perf_counter()
    blob, sizes = tg.pack_artifact(cfg, stored)
    times["pack_s"], start = time.perf_counter() - start, time.perf_counter()
    header, loaded = tg.unpack_artifact(blob)
    fresh = tg.meta_model(tg.artifact_config(cfg, header, {}))
    fresh.load_state_dict({t.name: t.dequantize() for t in loaded}, strict=True, assign=True)
    _, bpb = tg.eval_blocks(cfg, rt, fresh, val, tables, cfg.num_repeats)
    times["load_eval_s"] = time.perf_counter() - start
    assert fallbacks == 0
    return bpb, stored, blob, sizes, times


def main() -> None:
    env = {"PRESET": "demo", "MAX_WALLCLOCK_SECONDS": os.environ.pop("BENCH_TRAIN_SECONDS", "240"),
           "RUN_ID": "bench_quant", **os.environ}
    weights = Path(env.pop("BENCH_WEIGHTS", "logs/bench_quant_weights.pt"))
    selfgen_batches = int(env.pop("BENCH_SELFGEN_BATCHES", "4"))
    levels = [tuple(map(int, pair.split("/"))) for pair in env.pop("BENCH_LEVELS", "63/16").split(",")]
    cfg = tg.Config.from_env(env)
    rt = tg.Runtime(cfg, {})
    cfg = rt.cfg
    sp = sentencepiece.SentencePieceProcessor(model_file=cfg.tokenizer_path)
    tables, val = tg.build_byte_tables(sp, cfg.vocab_size), tg.load_val_tokens(cfg)
    model, batches = train_or_load(cfg, rt, val, tables, weights)
    _, float_bpb = tg.eval_blocks(cfg, rt, model, val, tables, cfg.num_repeats)
    print(f"float val_bpb:{float_bpb:.8f} val_tokens:{len(val) - 1}")
    hessians, calib = {"ref": {}, "clip": {}}, {"ref": (0, 0.0), "clip": (0, 0.0)}
    for source, n_batches in (("train", cfg.gptq_calib_batches), ("selfgen", selfgen_batches)):
        calib_cfg = dataclasses.replace(cfg, gptq_calib=source, gptq_calib_batches=n_batches)
        start = time.perf_counter()  # train batches continue the stream where training stopped, as in a real run
        hessians[f"gptq_{source}"] = tg.collect_hessians(rt, model, tg.calibration_batches(calib_cfg, rt, model,
                                                                                           batches))
        calib[f"gptq_{source}"] = (n_batches, time.perf_counter() - start)
    for quant_levels, mlp_quant_levels in levels:
        for label in hessians:
            run_cfg = dataclasses.replace(cfg, quant_method=label.partition("_")[0], compressor="auto",
                                          quant_levels=quant_levels, mlp_quant_levels=mlp_quant_levels)
            bpb, stored, blob, sizes, times = evaluate(run_cfg, rt, model, hessians[label], val, tables)
            reference = torch_save_bytes(stored)
            print(f"bench levels:{quant_levels}/{mlp_quant_levels} method:{label} calib_batches:{calib[label][0]} "
                  f"quant_penalty_bpb:{bpb - float_bpb:.8f} artifact_bytes:{len(blob)} zstd_bytes:{sizes['zstd']} "
                  f"brotli_bytes:{sizes['brotli']} torch_save_zstd22_bytes:{reference} "
                  f"ratio:{len(blob) / reference:.4f} calib_s:{calib[label][1]:.1f} "
                  + " ".join(f"{k}:{v:.2f}" for k, v in times.items()))
            if label == "gptq_train" and (quant_levels, mlp_quant_levels) == levels[0]:
                layout_sizes(stored)
                estimate = tg.estimate_model_bytes(run_cfg, tg.meta_model(run_cfg))
                print(f"dry_run_estimate model_bytes:{estimate} artifact_bytes:{len(blob)} "
                      f"error:{estimate / len(blob) - 1:+.4f}")


if __name__ == "__main__":
    main()
