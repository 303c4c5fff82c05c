"""The training loop against an older train_gpt.py (e.g. `git show 73d8b75:train_gpt.py > /tmp/old.py`), on CPU.

    python3 bench/loop_cpu.py stream /tmp/old.py   # token stream: every rank's batches at the record's shapes
    python3 bench/loop_cpu.py sha /tmp/old.py      # weights_sha256 of a tiny run, 1 process and 2 gloo ranks
    flock /tmp/bench.lock python3 bench/loop_cpu.py speed /tmp/old.py [runs] [1,2]   # step_avg, old/new

Needs the demo data (python3 data/prepare_demo.py). `stream` cuts its train shard into 7 uneven shards, so spans
straddle shard edges and the stream wraps; it resumes each new loader from the position a checkpoint saves.
"""

from __future__ import annotations

import importlib.util
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "data"))
import build_dataset  # noqa: E402
import train_gpt  # noqa: E402

DEMO = REPO / "data" / "datasets" / "demo_sp1024"
TOKENIZER = REPO / "data" / "tokenizers" / "demo_1024_bpe.model"


def load(path: str):
    spec = importlib.util.spec_from_file_location("train_gpt_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def stream(old_path: str) -> None:
    old = load(old_path)
    tokens = train_gpt.read_shard(train_gpt.shard_paths(str(DEMO), "train")[0])
    with tempfile.TemporaryDirectory() as tmp:
        cuts = np.cumsum([0, 311_111, 700_001, 123_457, 900_000, 555_555, 400_000])
        for i, (a, b) in enumerate(zip(cuts, [*cuts[1:], len(tokens)])):
            build_dataset.write_shard(Path(tmp) / f"fineweb_train_{i:06d}.bin", np.asarray(tokens[a:b]))
        paths, world, local, seq, steps, resume_at = train_gpt.shard_paths(tmp, "train"), 8, 65536, 1024, 60, 23
        compared = 0
        for rank in range(world):
            a = old.TrainBatches(old.TokenStream(paths), rank, world, local, seq, torch.device("cpu"))
            b = train_gpt.TrainBatches(train_gpt.TokenStream(paths), rank, world, local, seq, torch.device("cpu"))
            for step in range(steps):
                if step == resume_at:  # what each version's checkpoint saves, loaded into fresh loaders
                    saved_old, saved_new = [a.stream.file_index, a.stream.offset], list(b.position)
                    assert saved_old == saved_new, (saved_old, saved_new)
                    a = old.TrainBatches(old.TokenStream(paths), rank, world, local, seq, torch.device("cpu"))
                    a.stream.seek(*saved_old)
                    b = train_gpt.TrainBatches(train_gpt.TokenStream(paths), rank, world, local, seq,
                                               torch.device("cpu"))
                    b.seek(*saved_new)
                for x, y in zip(a.next(), b.next()):
                    assert torch.equal(x, y), (rank, step)
                    compared += x.numel()
        print(f"stream_identical:1 ranks:{world} steps:{steps} resume_at:{resume_at} shards:{len(paths)} "
              f"tokens_compared:{compared} epochs:{steps * world * (local + 1) / len(tokens):.1f}")


def tiny_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DATA_PATH=str(DEMO), TOKENIZER_PATH=str(TOKENIZER), VOCAB_SIZE="1024", MODEL_DIM="32", NUM_HEADS="4",
               NUM_KV_HEADS="2", MLP_MULT="2", TRAIN_SEQ_LEN="32", TRAIN_BATCH_TOKENS="256", GRAD_ACCUM_STEPS="1",
               ITERATIONS="40", MAX_WALLCLOCK_SECONDS="0", WARMDOWN_ITERS="10", LR_WARMUP_STEPS="2", SWA_EVERY="2",
               VAL_LOSS_EVERY="0", VAL_MAX_TOKENS="2048", VAL_BATCH_SIZE="1024", TRAIN_LOG_EVERY="1000",
               COMPILE="0", EVAL_STRIDE="0", QUANT_METHOD="clip", OMP_NUM_THREADS="1", RECORD="0", RUN_ID="bench")
    env.update(extra)
    return env


def run(script: str, env: dict[str, str], world: int, cwd: str) -> str:
    cmd = [sys.executable, script] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", script]
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def sha(old_path: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            digests = [re.search(r"^weights_sha256:(\w+)$", run(s, tiny_env(), world, tmp), re.M).group(1)
                       for s in (old_path, str(REPO / "train_gpt.py"))]
            print(f"world:{world} old:{digests[0][:16]} new:{digests[1][:16]} identical:{int(digests[0] == digests[1])}")


def speed(old_path: str, runs: int, worlds: list[int]) -> None:
    """Alternating old/new runs of 300 tiny steps; step_avg from the last val line (train time / steps)."""
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            times = {"old": [], "new": []}
            for _ in range(runs):
                for name, script in (("old", old_path), ("new", str(REPO / "train_gpt.py"))):
                    out = run(script, tiny_env(ITERATIONS="300", WARMDOWN_ITERS="50"), world, tmp)
                    times[name].append(float(re.search(r"^step:300/300 val_loss:.* step_avg:([\d.]+)ms$", out,
                                                       re.M).group(1)))
            old_ms, new_ms = statistics.median(times["old"]), statistics.median(times["new"])
            print(f"world:{world} runs:{runs} step_avg_ms old:{old_ms:.3f} new:{new_ms:.3f} "
                  f"steps_per_s old:{1000 / old_ms:.1f} new:{1000 / new_ms:.1f} ratio_new_over_old:{old_ms / new_ms:.3f}"
                  f" all_old:{times['old']} all_new:{times['new']}")


if __name__ == "__main__":
    mode, old_script = sys.argv[1], sys.argv[2]
    if mode == "stream":
        stream(old_script)
    elif mode == "sha":
        sha(old_script)
    else:
        speed(old_script, int(sys.argv[3]) if len(sys.argv) > 3 else 5,
              [int(w) for w in (sys.argv[4] if len(sys.argv) > 4 else "1,2").split(",")])
