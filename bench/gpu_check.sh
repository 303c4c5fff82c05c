#!/usr/bin/env bash
# Is train_gpt.py healthy on this GPU? One command, about 6-8 minutes, from a checkout (issue #11):
#
#   timeout 560 bash bench/gpu_check.sh        # exit 0: no FAIL line (WARNs allowed); 1: a FAIL; 124: timed out
#
# 1. setup: pip-installs only brotli / zstandard / sentencepiece if missing (never torch: the image's is used), from
#    GPU_CHECK_WHEELS (default ./wheels) when that folder exists, for a machine without network (see README);
# 2. probe: torch / CUDA / GPU, FlashAttention for the record's shapes, one optimizer step of the full model;
# 3. data: python3 data/prepare_demo.py (the bundled demo corpus; no download);
# 4. run: the record model (d=880, 3x4, PROG_DEPTH, GPTQ, mixer) under torchrun with one process, COMPILE=1, at one
#    rank's share of the record batch (65,536 tokens per step, no accumulation) for GPU_CHECK_SECONDS (120);
# 5. verdict: bench/gpu_check.py summarize prints PASS/WARN/FAIL/INFO lines and gpu_check:PASS|FAIL.
#
# Written to $OUT (else logs/): gpu_check_summary.txt, gpu_check_console.txt (everything rank 0 and torch printed),
# gpu_check_probe.txt, the run's logs/<RUN_ID>.txt. Any train_gpt knob set in the environment overrides the run's
# (e.g. MODEL_DIM=128 for a quick look); GPU_CHECK_ALLOW_CPU=1 runs steps 3-5 without a GPU (a CPU smoke test of
# this script: the probe and speed lines then FAIL or show INFO, the rest is checked as on a GPU).
set -u
cd "$(dirname "$0")/.."
started=$(date +%s)
out_dir=${OUT:-logs}
mkdir -p "$out_dir" logs
summary=$out_dir/gpu_check_summary.txt
console=$out_dir/gpu_check_console.txt
probe=$out_dir/gpu_check_probe.txt
say() { echo "gpu_check: $*" | tee -a "$summary"; }
: > "$summary"

# 1. setup
missing=$(python3 -c 'import importlib.util as u; print(" ".join(m for m in ("brotli", "zstandard", "sentencepiece") if u.find_spec(m) is None))')
wheels=${GPU_CHECK_WHEELS:-wheels}  # offline machines: a folder of wheels carried with the checkout
if [ -n "$missing" ] && [ -d "$wheels" ]; then
    say "installing $missing from $wheels/"
    python3 -m pip install --quiet --no-index --find-links "$wheels" $missing > "$out_dir/gpu_check_pip.txt" 2>&1 \
        || say "pip install from $wheels/ failed (see gpu_check_pip.txt)"
elif [ -n "$missing" ]; then
    say "installing $missing"
    python3 -m pip install --quiet $missing > "$out_dir/gpu_check_pip.txt" 2>&1 || say "pip install failed (see gpu_check_pip.txt)"
fi

# 2. probe
timeout 120 python3 bench/gpu_check.py probe > "$probe" 2>&1
probe_rc=$?
cat "$probe" | tee -a "$summary"
if [ "$probe_rc" -ne 0 ] && [ "${GPU_CHECK_ALLOW_CPU:-0}" != "1" ]; then
    python3 bench/gpu_check.py summarize --console /dev/null --rc "$probe_rc" --probe "$probe" | tee -a "$summary"
    exit 1
fi

# 3. data
if ! python3 data/prepare_demo.py > "$out_dir/gpu_check_data.txt" 2>&1; then
    tail -5 "$out_dir/gpu_check_data.txt" | tee -a "$summary"
fi
setup_s=$(( $(date +%s) - started ))

# 4. run: the record config on the demo data; the defaults below give way to the caller's environment.
export RUN_ID=${RUN_ID:-gpu_check_$(date +%Y%m%d_%H%M%S)}
export DATA_PATH=${DATA_PATH:-./data/datasets/demo_sp1024}
export TOKENIZER_PATH=${TOKENIZER_PATH:-./data/tokenizers/demo_1024_bpe.model}
export TRAIN_BATCH_TOKENS=${TRAIN_BATCH_TOKENS:-65536} GRAD_ACCUM_STEPS=${GRAD_ACCUM_STEPS:-1}
export VAL_BATCH_SIZE=${VAL_BATCH_SIZE:-65536}  # 64 rows: one rank's eval batch in the record run
export MAX_WALLCLOCK_SECONDS=${MAX_WALLCLOCK_SECONDS:-${GPU_CHECK_SECONDS:-120}}
export COMPILE=${COMPILE:-1} COMPRESSOR=${COMPRESSOR:-zstd} RECORD=${RECORD:-0}
export TRAIN_LOG_EVERY=${TRAIN_LOG_EVERY:-1} VAL_LOSS_EVERY=${VAL_LOSS_EVERY:-0}  # every step's time, no pauses
export WARMDOWN_ITERS=${WARMDOWN_ITERS:-600}  # the record's 3000 of ~4,340 steps, scaled to a 120 s run
export TORCH_LOGS=${TORCH_LOGS:-recompiles} PYTHONUNBUFFERED=1
say "run RUN_ID=$RUN_ID MAX_WALLCLOCK_SECONDS=$MAX_WALLCLOCK_SECONDS (setup ${setup_s}s)"
timeout "${GPU_CHECK_RUN_TIMEOUT:-450}" python3 -m torch.distributed.run --standalone --nproc_per_node=1 train_gpt.py > "$console" 2>&1
rc=$?
[ "$rc" -eq 124 ] && say "the run passed GPU_CHECK_RUN_TIMEOUT=${GPU_CHECK_RUN_TIMEOUT:-450}s and was stopped"
cp "logs/$RUN_ID.txt" "$out_dir/" 2>/dev/null

# 5. verdict
python3 bench/gpu_check.py summarize --console "$console" --rc "$rc" --probe "$probe" \
    --setup-seconds "$setup_s" --wall-seconds "$(( $(date +%s) - started ))" | tee -a "$summary"
exit "${PIPESTATUS[0]}"
