"""Wall time of train_gpt's self-generated GPTQ calibration (GPTQ_CALIB=selfgen) on CPU, in one process.

    python3 bench/selfgen_calib.py                          # this checkout's train_gpt.py
    python3 bench/selfgen_calib.py --script /tmp/old.py     # another version of the script, same shape

The shape is PRESET=pr1204 at MODEL_DIM=128 with TRAIN_SEQ_LEN=BENCH_SEQ_LEN (default 128) and TRAIN_BATCH_TOKENS
chosen so a training micro-batch has 48 rows, as in the 8-GPU run; any other knob comes from the environment
(e.g. GPTQ_CALIB_BATCHES for the pre-cache version). Prints one key:value line with the sequences sampled and the
median of BENCH_REPEATS calls.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def load(script: Path):
    spec = importlib.util.spec_from_file_location("train_gpt_bench", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--script", type=Path, default=Path(__file__).resolve().parent.parent / "train_gpt.py")
    args = parser.parse_args()
    tg = load(args.script)
    seq = int(os.environ.pop("BENCH_SEQ_LEN", "128"))
    repeats = int(os.environ.pop("BENCH_REPEATS", "1"))
    env = dict(PRESET="pr1204", MODEL_DIM="128", TRAIN_SEQ_LEN=str(seq), TRAIN_BATCH_TOKENS=str(48 * seq * 8),
               DEVICE="cpu", RUN_ID="bench_selfgen", **{k: v for k, v in os.environ.items() if k.isupper()})
    cfg = tg.Config.from_env(env)
    rt = tg.Runtime(cfg, {})
    torch.manual_seed(0)
    model = tg.build_model(cfg, rt)
    with torch.no_grad():  # a model that is not all zero-init projections, so the sampled text is not uniform
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    batches = SimpleNamespace(local_tokens=tg.local_batch_tokens(cfg, 1))
    times, inputs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        inputs = tg.calibration_batches(cfg, rt, model, batches)
        times.append(time.perf_counter() - start)
    sequences = sum(len(x) for x in inputs)
    print(f"selfgen_bench script:{args.script.name} sequences:{sequences} seq_len:{inputs[0].size(1)} "
          f"median_s:{statistics.median(times):.2f} runs:{repeats} threads:{torch.get_num_threads()}")


if __name__ == "__main__":
    main()
