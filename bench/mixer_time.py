"""Time the MIXER=normalized eval's mixer work alone on the demo val split (no model: fixed random neural features),
per eval batch as one process (world 1) or 8 ranks see it (a global batch of 8x the windows).

    python3 bench/mixer_time.py [--old OLD_train_gpt.py]

--old times an earlier train_gpt.py's per-batch score/check/update protocol next to this one's Mixer.mix (the mixer
that learns every MIXER_UPDATE_TARGETS targets). Prints one line per (script, world): median ms over 3 passes.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def one_pass(tg, cfg, val, features, row, world: int) -> float:
    mixer = tg.Mixer(cfg, val, torch.device("cpu"))
    plan = tg.window_plan(len(val) - 1, cfg.eval_seq_len, cfg.eval_stride)
    start = time.perf_counter()
    for batch in plan.split(cfg.eval_batch_seqs * world):
        first, last = int(batch[0, 0] + batch[0, 2]), int(batch[-1, 0] + batch[-1, 1])
        part = features[first:last]
        mix_args = inspect.signature(mixer.mix).parameters if hasattr(mixer, "mix") else {}
        if "log_probs" in mix_args:  # the Mixer draws its own spot check among this rank's targets
            mixer.mix(first, part, 0, row[None])
        elif mix_args:  # before that, the caller passed the probe (index, log-probs)
            mixer.mix(first, part, (0, row))
        else:  # the per-batch protocol before MIXER_UPDATE_TARGETS
            mixer.score(first, part[:, 0], part[:, 1])
            mixer.check(0, row)
            mixer.update()
    return 1000 * (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", type=Path, help="an earlier train_gpt.py to time next to this one")
    args = ap.parse_args()
    torch.set_num_threads(1)
    scripts = {"new": REPO / "train_gpt.py", **({"old": args.old} if args.old else {})}
    for label, path in scripts.items():
        tg = load(path, f"_bench_{label}")
        cfg = tg.Config.from_env({"PRESET": "demo", "DATA_PATH": str(REPO / "data/datasets/demo_sp1024")})
        val = tg.load_val_tokens(cfg)
        gen = torch.Generator().manual_seed(0)
        row = torch.randn(cfg.vocab_size, generator=gen).log_softmax(-1)
        features = torch.stack([torch.rand(len(val) - 1, generator=gen) * 8, torch.rand(len(val) - 1, generator=gen)
                                * 6], 1)
        for world in (1, 8):
            times = [one_pass(tg, cfg, val, features, row, world) for _ in range(3)]
            print(f"mixer_time script:{label} world:{world} targets:{len(val) - 1} median_ms:{statistics.median(times):.0f}"
                  f" runs_ms:{','.join(f'{t:.0f}' for t in times)}")


if __name__ == "__main__":
    main()
