"""Three seed-system shapes at demo size, same CPU wallclock budget, on the State of the Union demo corpus.

Measures, for a tiny (d=128) version of each system's architecture:
  pr1453  PRESET=demo as is: 3 shared blocks x 4 repeats, value embeddings, cross-repeat skips, SWA, GPTQ.
  pr1204  11->6 layers with 2,3 repeated from 44% of the run, gated U-Net, parallel lanes, bigram, EMA, int6/int5.
  pr456   6 unique layers, additive U-Net, bigram, smear, relu^2, XSA on 2, clip quantization.
Each trains single-process for the same MAX_WALLCLOCK_SECONDS with TTT=1 TTT_CHUNK_TOKENS=4096 and RECORD=0, and
the table gives params, steps, train time, float / roundtrip / sliding-window / TTT val_bpb, the TTT gain
(ttt - sliding, negative = TTT helps) and the artifact bytes. These are CPU proxies, not challenge results.

    python3 bench/presets_cpu.py                      # all three, 240 s each (about 20 min on 2 cores)
    python3 bench/presets_cpu.py --dry-run            # DRY_RUN=1: check each config is accepted, print params
    python3 bench/presets_cpu.py --script /tmp/copy/train_gpt.py --seconds 60 --only pr456

The run's cwd is the script's folder (logs go to its logs/); stdout of each run is also kept as
logs/presets_cpu_<name>.out. Needs `python3 data/prepare_demo.py` first (DATA_PATH/TOKENIZER_PATH are absolute).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CONFIGS: dict[str, dict[str, str]] = {
    "pr1453": {},
    "pr1204": dict(
        NUM_LAYERS="6", NUM_REPEATS="2", RECUR_LAYERS="2,3", PROG_DEPTH="0.44:1,1.0:2", NUM_VALUE_EMBEDS="0",
        LOOP_EMBED="0", CROSS_REPEAT="0", UNTIE_SCALARS="1", UNTIE_REPEAT_MLP="1", UNET="gated", PARALLEL_LAST_N="2",
        BIGRAM_VOCAB_SIZE="1024", BIGRAM_DIM="32", SMEAR_GATE="1", ROPE_DIMS="16", LN_SCALE="1", VE_DIM="32",
        VE_LAYERS="6,7", DISABLE_LAYER0_ATTN="1", XSA_LAST_N="6", SWA_ENABLED="0", EMA_DECAY="0.99",
        QUANT_LEVELS="31", MLP_QUANT_LEVELS="15", QUANT_HIGH_TENSORS="8",
    ),
    "pr456": dict(
        NUM_LAYERS="6", NUM_REPEATS="1", PROG_DEPTH="1.0:1", NUM_VALUE_EMBEDS="0", LOOP_EMBED="0", UNET="add",
        BIGRAM_VOCAB_SIZE="1024", BIGRAM_DIM="32", SMEAR_GATE="1", XSA_LAST_N="2", MLP_NEGATIVE_SLOPE="0",
        QUANT_LEVELS="31", MLP_QUANT_LEVELS="15", QUANT_METHOD="clip",
    ),
}

COMMON = dict(PRESET="demo", TTT="1", TTT_CHUNK_TOKENS="4096", RECORD="0")

# Last value of `<name> ... val_bpb:<x>` wins, so the `_exact` line (8 decimals) overrides the rounded one.
EVALS = ("final_float", "final_roundtrip", "final_sliding_window", "final_mixer", "final_ttt")


def parse_log(text: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for line in text.splitlines():
        if m := re.match(r"model_params:(\d+)", line):
            out["params"] = int(m.group(1))
        elif m := re.match(r"step:(\d+)/\d+ val_loss:\S+ val_bpb:\S+ train_time:(\d+)ms", line):
            out["steps"], out["train_s"] = int(m.group(1)), int(m.group(2)) / 1000
        elif m := re.match(r"artifact .*total_bytes:(\d+)", line):
            out["bytes"] = int(m.group(1))
        elif m := re.match(r"(final_\w+?)(?:_exact)? val_loss:\S+ val_bpb:([\d.]+)", line):
            out[m.group(1)] = float(m.group(2))
        elif line.startswith(("config_error:", "artifact_error:", "Traceback")):
            out.setdefault("error", line)
    return out


def run(name: str, script: Path, seconds: float, data: Path, tok: Path, dry: bool) -> tuple[dict, float, int]:
    env = {**os.environ, **COMMON, **CONFIGS[name], "MAX_WALLCLOCK_SECONDS": str(seconds),
           "DATA_PATH": str(data), "TOKENIZER_PATH": str(tok), "RUN_ID": f"presets_cpu_{name}"}
    if dry:
        env["DRY_RUN"] = "1"
    start = time.time()
    proc = subprocess.run([sys.executable, script.name], cwd=script.parent, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wall = time.time() - start
    if not dry:
        (script.parent / "logs").mkdir(exist_ok=True)
        (script.parent / "logs" / f"presets_cpu_{name}.out").write_text(proc.stdout)
    result = parse_log(proc.stdout)
    if proc.returncode != 0 and "error" not in result:
        result["error"] = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "no output"
    return result, wall, proc.returncode


def fmt(x: object, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=240.0, help="MAX_WALLCLOCK_SECONDS of every run")
    ap.add_argument("--script", type=Path, default=REPO / "train_gpt.py", help="train_gpt.py to run (cwd = its folder)")
    ap.add_argument("--data-path", type=Path, default=REPO / "data/datasets/demo_sp1024")
    ap.add_argument("--tokenizer-path", type=Path, default=REPO / "data/tokenizers/demo_1024_bpe.model")
    ap.add_argument("--only", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--dry-run", action="store_true", help="DRY_RUN=1: check configs and print params only")
    args = ap.parse_args()
    script = args.script.resolve()

    rows = []
    for name in args.only:
        r, wall, rc = run(name, script, args.seconds, args.data_path.resolve(), args.tokenizer_path.resolve(),
                          args.dry_run)
        print(f"# {name}: exit {rc}, wall {wall:.0f}s" + (f", ERROR {r['error']}" if "error" in r else ""),
              flush=True)
        rows.append((name, r))

    head = ("config", "params", "steps", "train_s", "float", "roundtrip", "sliding", "mixer", "ttt", "ttt-slide",
            "bytes")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, r in rows:
        gain = r["final_ttt"] - r["final_sliding_window"] if "final_ttt" in r and "final_sliding_window" in r else None
        cells = (name, fmt(r.get("params"), ","), fmt(r.get("steps"), "d"), fmt(r.get("train_s"), ".1f"),
                 *(fmt(r.get(k), ".4f") for k in EVALS), fmt(gain, "+.4f"), fmt(r.get("bytes"), ","))
        print("| " + " | ".join(cells) + " |")
    print(f"CPU proxies on the State of the Union demo corpus ({args.seconds:.0f} s budget, 1 process), "
          "not challenge results.")


if __name__ == "__main__":
    main()
