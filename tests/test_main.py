"""Whole-script behaviour through real subprocesses: import purity, DRY_RUN, config errors, single-process and
2-rank torchrun (gloo) training runs that write the artifact, read it back, evaluate and exit 0 on every rank;
EVAL_ONLY on that artifact; the over-budget exit."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

SCRIPT = str(REPO / "train_gpt.py")


def tiny_env(demo_subset: dict, **overrides: str) -> dict[str, str]:
    """The environment of a tiny real run on the demo subset (step-based schedule, every stage exercised)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DATA_PATH=demo_subset["data_path"], TOKENIZER_PATH=demo_subset["tokenizer_path"],
               VOCAB_SIZE=str(demo_subset["vocab_size"]), MODEL_DIM="32", NUM_HEADS="4", NUM_KV_HEADS="2",
               MLP_MULT="2", TRAIN_SEQ_LEN="32", TRAIN_BATCH_TOKENS="256", GRAD_ACCUM_STEPS="1", ITERATIONS="12",
               MAX_WALLCLOCK_SECONDS="0", WARMDOWN_ITERS="6", LR_WARMUP_STEPS="2", SWA_EVERY="2", VAL_LOSS_EVERY="6",
               VAL_BATCH_SIZE="1024", VAL_MAX_TOKENS="2048", TRAIN_LOG_EVERY="4", RUN_ID="tiny", COMPILE="0",
               EVAL_SEQ_LEN="64", EVAL_STRIDE="16", OMP_NUM_THREADS="1",
               RECORD="0")  # the records folder has its own tests (test_records.py)
    env.update(overrides)
    return env


def run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_import_has_no_side_effects(tmp_path):
    code = ("import os, torch, train_gpt; "
            "assert not torch.cuda.is_initialized(); "
            "assert not torch.distributed.is_initialized(); "
            "print(sorted(os.listdir('.')))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "MODEL_DIM": "not-a-number"}
    out = run([sys.executable, "-c", code], env, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]" and out.stderr == ""  # no prints, no files, env not read


def test_dry_run_prints_config_count_and_table(tmp_path):
    env = {**os.environ, "DRY_RUN": "1"}
    out = run([sys.executable, SCRIPT], env, tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    config = json.loads(lines[0].removeprefix("config:"))
    assert config["model_dim"] == 880 and config["prog_depth"] == "0.30:2,0.50:3,1.0:4"
    assert "model_params:23662344" in lines
    estimate = re.fullmatch(r"artifact_estimate code_bytes:(\d+) model_bytes:(\d+) total_bytes:\d+ "
                            r"budget_bytes:16000000 headroom_bytes:-?\d+", lines[-1])
    assert estimate and int(estimate.group(1)) == len(Path(SCRIPT).read_bytes())
    rows = [line for line in lines if line.startswith("param ")]
    assert len(rows) == 10 + 3 * 6  # 10 model-level tensors (embeddings, recurrence, gains and scales) + 6 per block
    assert any("blocks.0.mlp.fc.weight shape:2640x880 group:muon dtype:float32 store:q(levels=16" in r for r in rows)
    assert list(tmp_path.iterdir()) == []  # no logs, no data, no device work


def test_dry_run_with_a_checkpoint_that_cannot_be_read_is_one_config_error(tmp_path):
    (tmp_path / "not.ckpt").write_bytes(b"not a checkpoint")
    for resume, message in [("missing.ckpt", "no checkpoint at missing.ckpt"), ("not.ckpt", "not a torch.save zip")]:
        out = run([sys.executable, SCRIPT], {**os.environ, "DRY_RUN": "1", "RESUME": resume}, tmp_path)
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip().splitlines() == [out.stderr.strip()] and message in out.stderr
        assert out.stderr.startswith("config_error: ")


@pytest.mark.parametrize("env_update, message", [
    ({"MODEL_DIM": "88O"}, "MODEL_DIM must be a number"),
    ({"WARMDOWN_ITER": "3000"}, "did you mean WARMDOWN_ITERS"),
    ({"PRESET": "nope"}, "unknown PRESET"),
    ({"NUM_HEADS": "7"}, "NUM_HEADS=7 must divide MODEL_DIM=880"),
    ({"PROG_DEPTH": "0.3:2,0.5:9"}, "PROG_DEPTH repeats 9"),
])
def test_bad_config_fails_fast_with_exit_code_2(tmp_path, env_update, message):
    out = run([sys.executable, SCRIPT], {**os.environ, **env_update}, tmp_path)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and message in out.stderr and out.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_batch_that_does_not_split_across_ranks_fails_with_exit_code_2(tmp_path, demo_subset):
    env = tiny_env(demo_subset, TRAIN_BATCH_TOKENS="96")  # 96 tokens are not whole 32-token rows per... 3 rows
    env.update(GRAD_ACCUM_STEPS="2")
    out = run([sys.executable, SCRIPT], env, tmp_path)
    assert out.returncode == 2 and "does not split" in out.stderr


def read_log(tmp_path: Path, run_id: str = "tiny") -> tuple[str, list[dict]]:
    text = (tmp_path / "logs" / f"{run_id}.txt").read_text()
    records = [json.loads(line) for line in (tmp_path / "logs" / f"{run_id}.jsonl").read_text().splitlines()]
    return text, records


def test_single_process_run_logs_every_stage(tmp_path, demo_subset):
    out = run([sys.executable, SCRIPT], tiny_env(demo_subset), tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    text, records = read_log(tmp_path)
    assert text.startswith('"""Depth-recurrent GPT')  # the source heads the log file, not the console
    assert '"""Depth-recurrent' not in out.stdout
    for pattern in [r"^model_params:\d+$", r"^world_size:1 ", r"^step:1/12 train_loss:[\d.]+ ",
                    r"^step:6/12 val_loss:[\d.]+ val_bpb:[\d.]+ train_time:\d+ms step_avg:[\d.]+ms$",
                    r"^prog_depth:switch repeats:3 step:4 frac:0.333$", r"^prog_depth:switch repeats:4 step:6 ",
                    r"^swa:start step:\d+$", r"^swa:apply checkpoints:\d+$",
                    r"^final_float_exact val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8}$",
                    r"^final_sliding_window val_loss:[\d.]+ val_bpb:[\d.]+ window:64 stride:16 eval_time:\d+ms$",
                    r"^final_sliding_window_exact val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8}$",
                    r"^final_mixer val_loss:[\d.]+ val_bpb:[\d.]+ eval_time:\d+ms$",
                    r"^final_mixer_exact val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8}$",
                    r"^mixer_mass_max_abs_err:\S+ target_max_abs_err:\S+ mean_weights neural:"]:
        assert re.search(pattern, out.stdout, re.M), pattern
    assert [r["name"] for r in records] == ["val", "val", "val", "final_float", "final_roundtrip",
                                            "final_sliding_window", "final_mixer"]
    assert all(r["repeats"] == 4 for r in records[3:]) and records[0]["val_bpb"] > records[3]["val_bpb"]
    assert records[-1]["mixer_mass_max_abs_err"] <= 1e-5 and records[-1]["eval_time_ms"] > 0
    for pattern in [r"^quant method:gptq calib:train batches:16 time_ms:\d+ train_plus_calib_ms:\d+$",
                    r"^artifact path:logs/tiny.ptz method:gptq gptq_fallbacks:0 codec:(zstd|brotli) "
                    r"zstd_bytes:\d+ brotli_bytes:\d+ time_ms:\d+$",
                    r"^artifact code_bytes:\d+ model_bytes:\d+ total_bytes:\d+ budget_bytes:16000000 "
                    r"headroom_bytes:\d+$",
                    r"^final_roundtrip val_loss:[\d.]+ val_bpb:[\d.]+ eval_time:\d+ms$",
                    r"^final_roundtrip_exact val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8}$",
                    r"^quant_penalty_bpb:-?\d+\.\d{8}$"]:
        assert re.search(pattern, out.stdout, re.M), pattern
    sizes = re.search(r"^artifact code_bytes:(\d+) model_bytes:(\d+) total_bytes:(\d+)", out.stdout, re.M).groups()
    assert int(sizes[0]) == len(Path(SCRIPT).read_bytes())
    assert int(sizes[1]) == (tmp_path / "logs" / "tiny.ptz").stat().st_size
    assert int(sizes[0]) + int(sizes[1]) == int(sizes[2])
    floats = [float(re.search(rf"^{k}_exact val_loss:\S+ val_bpb:(\S+)$", out.stdout, re.M).group(1))
              for k in ("final_float", "final_roundtrip")]
    penalty = float(re.search(r"^quant_penalty_bpb:(\S+)$", out.stdout, re.M).group(1))
    assert penalty == pytest.approx(floats[1] - floats[0], abs=2e-8) and abs(penalty) < 0.05
    assert records[4]["val_bpb"] == pytest.approx(floats[1], abs=1e-8)


def test_ema_and_hessian_bit_allocation_run_end_to_end(tmp_path, demo_subset):
    env = tiny_env(demo_subset, EMA_DECAY="0.9", SWA_ENABLED="0", QUANT_HIGH_TENSORS="5", EVAL_STRIDE="0")
    out = run([sys.executable, SCRIPT], env, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"^ema:apply decay:0.9$", out.stdout, re.M) and "swa:" not in out.stdout
    assert re.search(r"^quant_levels high:5 low:13 by:hessian_rounding_error$", out.stdout, re.M)  # 18 linears
    assert re.search(r"^final_roundtrip_exact val_loss:\d+\.\d{8} ", out.stdout, re.M)


def test_wallclock_cap_stops_early_and_calibrates_inside_the_budget(tmp_path, demo_subset):
    env = tiny_env(demo_subset, MAX_WALLCLOCK_SECONDS="3", GPTQ_RESERVE_SECONDS="1", ITERATIONS="100000",
                   VAL_LOSS_EVERY="0", GPTQ_CALIB_BATCHES="2")
    out = run([sys.executable, SCRIPT], env, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"^gptq_reserve:1s train_budget:2s$", out.stdout, re.M)
    stop = re.search(r"^stopping_early: wallclock_cap train_time:(\d+)ms step:\d+/100000$", out.stdout, re.M)
    assert stop and 1000 <= int(stop.group(1)) <= 2000  # training stops within the shortened budget
    used = int(re.search(r"^quant method:gptq calib:train batches:2 .* train_plus_calib_ms:(\d+)$", out.stdout,
                         re.M).group(1))
    assert used <= 3000 and "gptq_calib_over_budget" not in out.stdout
    assert "final_float_exact" in out.stdout and "final_roundtrip_exact" in out.stdout


def test_eval_only_reproduces_the_roundtrip_from_the_artifact_alone(tmp_path, demo_subset):
    trained = tmp_path / "train"
    trained.mkdir()
    out = run([sys.executable, SCRIPT], tiny_env(demo_subset, QUANT_METHOD="clip"), trained)
    assert out.returncode == 0, out.stderr[-3000:]
    want = re.search(r"^final_roundtrip_exact .*$", out.stdout, re.M).group(0)
    val_only = tmp_path / "val_only"  # no train shards: EVAL_ONLY needs the val split and the tokenizer only
    val_only.mkdir()
    for shard in Path(demo_subset["data_path"]).glob("fineweb_val_*.bin"):
        (val_only / shard.name).write_bytes(shard.read_bytes())
    env = tiny_env(demo_subset, DATA_PATH=str(val_only), EVAL_ONLY=str(trained / "logs" / "tiny.ptz"), RUN_ID="check")
    for shape_knob in ("VOCAB_SIZE", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "MLP_MULT"):
        env.pop(shape_knob)  # the shape comes from the artifact's header
    out = run([sys.executable, SCRIPT], env, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"^final_roundtrip_exact .*$", out.stdout, re.M).group(0) == want
    assert re.search(r"^artifact code_bytes:\d+ model_bytes:\d+ ", out.stdout, re.M)
    assert not re.search(r"^(step|final_float|quant_penalty)", out.stdout, re.M)
    clash = run([sys.executable, SCRIPT], {**env, "MODEL_DIM": "64"}, tmp_path)
    assert clash.returncode == 2 and clash.stdout.count("final_roundtrip") == 0
    assert clash.stderr.count("\n") == 1 and "artifact has MODEL_DIM=32, the environment sets 64" in clash.stderr
    (tmp_path / "model.pt").write_bytes((trained / "logs" / "tiny.ptz").read_bytes()[:100])
    broken = run([sys.executable, SCRIPT], {**env, "EVAL_ONLY": str(tmp_path / "model.pt")}, tmp_path)
    assert broken.returncode == 2 and broken.stderr.count("\n") == 1 and "truncated artifact" in broken.stderr


def test_over_budget_run_still_evaluates_then_fails_loudly(tmp_path, demo_subset):
    """The budget counts the bytes of the running script, so a copy padded past 16,000,000 bytes is over it."""
    script = tmp_path / "train_gpt.py"
    script.write_text(Path(SCRIPT).read_text() + "\n# " + "x" * 16_000_000 + "\n")
    out = run([sys.executable, str(script)], tiny_env(demo_subset, QUANT_METHOD="clip", ITERATIONS="2"), tmp_path)
    assert out.returncode == 1
    excess = int(re.search(r"^artifact_over_budget excess_bytes:(\d+) ", out.stdout, re.M).group(1))
    total = int(re.search(r"^artifact code_bytes:\d+ model_bytes:\d+ total_bytes:(\d+) ", out.stdout, re.M).group(1))
    assert excess == total - 16_000_000 > 0
    assert re.search(r"^final_roundtrip_exact ", out.stdout, re.M) and (tmp_path / "logs" / "tiny.ptz").exists()


def test_torchrun_two_gloo_ranks_train_evaluate_and_exit_zero(tmp_path, demo_subset):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT]
    out = run(cmd, tiny_env(demo_subset), tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]  # torchrun exits 0 only when every rank did
    assert re.search(r"^world_size:2 ", out.stdout, re.M)
    assert len(re.findall(r"^precision:(bf16|fp32) reason:cpu_matmul_probe bf16_ms:\S+ fp32_ms:\S+$", out.stdout,
                          re.M)) == 1  # rank 0 decided for both ranks, logged once
    for name in ("final_float", "final_roundtrip", "final_sliding_window", "final_mixer"):  # rank 0 logs, once
        assert len(re.findall(rf"^{name}_exact ", out.stdout, re.M)) == 1, name
    text, records = read_log(tmp_path)
    assert [r["name"] for r in records[-4:]] == ["final_float", "final_roundtrip", "final_sliding_window",
                                                 "final_mixer"]
    assert all(r["val_bpb"] == r["val_bpb"] for r in records)  # not NaN


def torchrun_cmd() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT]


def exact_lines(stdout: str) -> tuple[str, str]:
    final = re.search(r"^final_float_exact .*$", stdout, re.M).group(0)
    return final, re.search(r"^weights_sha256:\w+$", stdout, re.M).group(0)


def test_sigterm_checkpoint_and_resume_is_bit_identical(tmp_path, demo_subset):
    """Kill a 2-rank torchrun run mid-training with SIGTERM, resume it, and get the uninterrupted run's bytes."""
    env = tiny_env(demo_subset, ITERATIONS="40", WARMDOWN_ITERS="20", VAL_LOSS_EVERY="10", TRAIN_LOG_EVERY="1")
    full = run(torchrun_cmd(), {**env, "RUN_ID": "full"}, tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]

    proc = subprocess.Popen(torchrun_cmd(), env={**env, "RUN_ID": "cut"}, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("step:5/40 train_loss"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    proc.wait(timeout=120)
    assert re.search(r"^checkpoint:saved path:logs/cut.ckpt step:\d+ ", rest, re.M), rest
    assert re.search(r"^stopped: signal step:(\d+) ", rest, re.M), rest
    assert int(re.search(r"^stopped: signal step:(\d+)", rest, re.M).group(1)) < 40
    assert (tmp_path / "logs" / "cut.ckpt").is_file() and not list((tmp_path / "logs").glob("*.tmp"))
    assert "final_float_exact" not in rest

    resumed = run(torchrun_cmd(), {**env, "RUN_ID": "cut", "RESUME": "auto"}, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint:resumed path:logs/cut.ckpt" in resumed.stdout
    assert exact_lines(resumed.stdout) == exact_lines(full.stdout)


def test_periodic_checkpoints_and_refusals(tmp_path, demo_subset):
    env = tiny_env(demo_subset, CHECKPOINT_EVERY_SECONDS="0.000001", ITERATIONS="3")
    out = run([sys.executable, SCRIPT], env, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(re.findall(r"^checkpoint:saved ", out.stdout, re.M)) >= 3
    assert not list((tmp_path / "logs").glob("*.tmp"))
    other = run([sys.executable, SCRIPT], {**env, "RESUME": "logs/tiny.ckpt", "MODEL_DIM": "64"}, tmp_path)
    assert other.returncode == 2
    assert "checkpoint of another configuration (differs in: model_dim)" in other.stderr
    evals_only = run([sys.executable, SCRIPT], {**env, "RESUME": "logs/tiny.ckpt", "MIXER": "off"}, tmp_path)
    assert evals_only.returncode == 0, evals_only.stderr[-3000:]  # knobs used only after training may change
    assert "checkpoint:resumed path:logs/tiny.ckpt" in evals_only.stdout and "final_mixer" not in evals_only.stdout
    missing = run([sys.executable, SCRIPT], {**env, "RESUME": "auto", "RUN_ID": "nothing"}, tmp_path)
    assert missing.returncode == 2 and "no checkpoint at logs/nothing.ckpt" in missing.stderr
