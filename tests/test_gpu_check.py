"""bench/gpu_check.py, the verdict half of bench/gpu_check.sh, on a recorded console of a real CPU run of the check.

The fixture is what `GPU_CHECK_ALLOW_CPU=1 bash bench/gpu_check.sh` printed for a tiny model (d=64, COMPILE=1,
TORCH_LOGS=recompiles; command in tests/fixtures/README.md). GPU verdicts are tested by rewriting its numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

import train_gpt
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "gpu_check_cpu_console.txt"
NO_CUDA_PROBE = "probe python:3.11 torch:2.13.0+cpu cuda:None device:none\nprobe_fail:no CUDA device\n"
GPU_PROBE = "probe python:3.12 torch:2.9.1 cuda:12.8 device:NVIDIA_H100\nprobe_flash eligible:1\n" \
            "probe_optimizer_step_ms:2.10\n"


@pytest.fixture(scope="module")
def console() -> str:
    return FIXTURE.read_text(encoding="utf-8")


def statuses(checks) -> dict[str, str]:
    return {c.name: c.status for c in checks}


def as_h100(text: str, ms_per_depth: dict[int, float]) -> str:
    """The recorded run as if an H100 had run the record shape: its device name and config, each step taking
    ms_per_depth[repeats], a GPU's memory line and a calibration within the reserve."""
    config = json.loads(re.search(r"^config:(.*)$", text, re.M).group(1))
    config.update(model_dim=880, num_heads=8, num_kv_heads=4, train_seq_len=1024, train_batch_tokens=65536)
    text = re.sub(r"^config:.*$", lambda _: "config:" + json.dumps(config), text, count=1, flags=re.M)
    text = text.replace("device:cpu(2 cores)", "device:NVIDIA H100 80GB HBM3")
    text = text.replace("peak_memory: n/a (cpu)", "peak_memory allocated:30666MiB reserved:31708MiB")
    text = re.sub(r"^gptq_calib_over_budget .*\n", "", text, flags=re.M)  # a GPU calibrates within the 8 s reserve
    text = re.sub(r"^(quant method:gptq .*time_ms:)\d+", r"\g<1>3100", text, flags=re.M)
    clock = [0.0]

    def retime(m: re.Match) -> str:
        clock[0] += ms_per_depth[int(m.group(2))]
        return f"{m.group(1)}repeats:{m.group(2)} train_time:{clock[0]:.0f}ms"

    return re.sub(r"^(step:\d+/\d+ train_loss:\S+ lr_scale:\S+ )repeats:(\d+) train_time:\d+ms", retime, text,
                  flags=re.M)


def test_the_recorded_run_parses(console):
    run = gpu_check.parse(console)
    assert run.device == "cpu(2 cores)" and run.world_size == 1 and run.compile_on
    assert run.config["model_dim"] == 64 and run.config["train_log_every"] == 1
    assert run.compile_warmup_ms > 0 and run.val_tokens == 8192
    assert [r for r, _ in run.switches] == [3, 4]
    assert {r for _, r, _, _ in run.steps} == {2, 3, 4} and run.steps[0][0] == 1
    assert run.swa_checkpoints >= 2 and run.calib_ms > 0 and run.gptq_reserve_s == 8.0 and not run.calib_over_budget
    assert set(run.evals) == run.exact == {"final_float", "final_roundtrip", "final_sliding_window", "final_mixer"}
    assert run.artifact["gptq_fallbacks"] == "0" and run.total_bytes > 0
    assert run.quant_penalty is not None and run.mixer_mass_err < 1e-6
    # the forward's 7 graphs (train + eval at depths 2, 3, 4 and the sliding eval) and Newton-Schulz's 3 (one per
    # Muon shape): 6 + 2 recompiles while priming, none after
    assert run.recompiles == {"priming": 8, "training": 0, "after": 0}
    assert run.primed == {"forward": 6, "newton_schulz": 2}
    assert gpu_check.primed_graphs(run.config) == {"forward": 7, "newton_schulz": 3}
    assert run.traceback is None


def test_the_cpu_run_fails_only_for_having_no_gpu(console):
    checks = gpu_check.verdict(gpu_check.parse(console), 0, NO_CUDA_PROBE)
    got = statuses(checks)
    assert got["probe"] == "FAIL"  # no CUDA device
    assert [c.name for c in checks if c.status == "FAIL"] == ["probe"]
    assert got["calibration"] == got["recompiles while priming"] == "PASS"  # 2.6 s of the 8 s reserve
    assert got["train loss"] == "PASS"
    assert got["exit code"] == got["required lines"] == got["recompiles during training"] == "PASS"
    assert got["step depth 4"] == "INFO"  # speed limits are for H100/H200-class GPUs only
    assert got["peak memory"] == "N/A"


def test_an_h100_at_the_reference_speed_passes(console):
    checks = gpu_check.verdict(gpu_check.parse(as_h100(console, {2: 90.0, 3: 133.0, 4: 177.0})), 0, GPU_PROBE)
    got = statuses(checks)
    assert not [c.line() for c in checks if c.status == "FAIL"]
    assert got["step depth 2"] == got["step depth 3"] == got["step depth 4"] == "PASS"
    assert got["projected 8xH100 steps"] == "PASS" and got["peak memory"] == "PASS"
    step4 = next(c for c in checks if c.name == "step depth 4").detail
    assert "median 177.0 ms" in step4 and "370,260 tokens/s, 211.8 TFLOP/s MFU 21.4% of 989" in step4


def test_slow_steps_warn_then_fail(console):
    got = statuses(gpu_check.verdict(gpu_check.parse(as_h100(console, {2: 100.0, 3: 133.0, 4: 200.0})), 0,
                                     GPU_PROBE))
    assert (got["step depth 2"], got["step depth 3"], got["step depth 4"]) == ("WARN", "PASS", "WARN")
    got = statuses(gpu_check.verdict(gpu_check.parse(as_h100(console, {2: 90.0, 3: 133.0, 4: 215.0})), 0, GPU_PROBE))
    assert got["step depth 4"] == "FAIL" and got["projected 8xH100 steps"] == "WARN"


def test_primed_graphs_of_the_presets_follow_their_muon_shapes():
    record = gpu_check.primed_graphs(dataclasses.asdict(train_gpt.Config()))
    assert record == {"forward": 7, "newton_schulz": 3}  # 880x880, 440x880, 880x2640
    seed_1204 = gpu_check.primed_graphs(dataclasses.asdict(train_gpt.Config.from_env({"PRESET": "pr1204"})))
    assert seed_1204 == {"forward": 5, "newton_schulz": 5}  # + bigram.proj 512x160, v_embed.proj 128x256
    assert gpu_check.primed_graphs({"prog_depth": "1.0:4", "eval_stride": 0, "autocast": True}) == {"forward": 2}


def test_projection_formula():
    cfg = {"prog_depth": "0.30:2,0.50:3,1.0:4", "quant_method": "gptq", "gptq_calib": "train",
           "gptq_reserve_seconds": 8.0}
    steps = gpu_check.projected_steps(cfg, {2: 90.0, 3: 133.0, 4: 177.0})
    want = 177.6e3 / 90.5 + 118.4e3 / 133.5 + 296e3 / 177.5  # 0.3 / 0.2 / 0.5 of 592 s
    assert steps == pytest.approx(want)
    assert gpu_check.projected_steps(cfg, {2: 90.0, 4: 177.0}) is None


def test_eval_batch_counts_of_the_record():
    assert -(-gpu_check.windows(gpu_check.FULL_VAL_TARGETS, 1024, 256) // (32 * 8)) == 947  # sliding
    assert -(-gpu_check.windows(gpu_check.FULL_VAL_TARGETS, 1024, 1024) // (64 * 8)) == 119  # roundtrip


def test_model_flops_of_the_record_shape():
    cfg = {"model_dim": 880, "num_heads": 8, "num_kv_heads": 4, "mlp_mult": 3.0, "num_layers": 3, "vocab_size": 1024,
           "train_seq_len": 1024, "recur_layers": ""}
    matrices = 12 * (880 * (2 * 880 + 2 * 440) + 2 * 880 * 2640) + 1024 * 880
    assert gpu_check.train_flops_per_token(cfg, 4) == 6 * matrices + 6 * 12 * 1024 * 880


@pytest.mark.parametrize("edit, name", [
    (lambda t: t + "[rank0]: Traceback (most recent call last):\n[rank0]:   File \"x\"\n"
     "[rank0]: torch.OutOfMemoryError: CUDA out of memory.\n", "traceback"),
    (lambda t: t + "W1201 torch/_dynamo/convert_frame.py] torch._dynamo hit config.recompile_limit (64)\n",
     "recompile limit"),
    (lambda t: re.sub(r"^final_mixer_exact .*\n", "", t, flags=re.M), "required lines"),
    (lambda t: re.sub(r"^swa:apply checkpoints:\d+", "swa:apply checkpoints:1", t, flags=re.M), "required lines"),
    (lambda t: t.replace("stopping_early:", "[rank0]:V1201 [0/7] [__recompiles] Recompiling function forward in x\n"
                         "stopping_early:"), "recompiles during training"),
    (lambda t: t.replace("compile_warmup_ms:", "[__recompiles] Recompiling function forward\ncompile_warmup_ms:"),
     "recompiles while priming"),
    (lambda t: t.replace("compile_warmup_ms:", "[__recompiles] Recompiling function newton_schulz\ncompile_warmup_ms:"),
     "recompiles while priming"),  # a 4th Newton-Schulz graph for 3 Muon shapes
    (lambda t: t.replace("quant method:gptq", "gptq_calib_over_budget train_plus_calib_ms:1 budget_ms:0\n"
                         "quant method:gptq"), "calibration"),
    (lambda t: re.sub(r"gptq_fallbacks:0", "gptq_fallbacks:2", t), "gptq fallbacks"),
    (lambda t: re.sub(r"^mixer_mass_max_abs_err:\S+", "mixer_mass_max_abs_err:3.0e-05", t, flags=re.M),
     "mixer mass error"),
    (lambda t: t.replace("allocated:30666MiB", "allocated:60000MiB"), "peak memory"),
    (lambda t: re.sub(r"(^step:2\d/\d+ train_loss:)\S+", r"\1nan", t, flags=re.M), "train loss"),
    (lambda t: re.sub(r"(^quant method:gptq .*time_ms:)\d+", r"\g<1>9000", t, flags=re.M), "calibration"),
    (lambda t: re.sub(r"^quant_penalty_bpb:\S+", "quant_penalty_bpb:0.25000000", t, flags=re.M), "quant penalty"),
    (lambda t: t.replace("compile:1", "compile:0"), "compile"),
])
def test_each_broken_figure_fails(console, edit, name):
    checks = gpu_check.verdict(gpu_check.parse(edit(as_h100(console, {2: 90.0, 3: 133.0, 4: 177.0}))), 0, GPU_PROBE)
    assert statuses(checks)[name] == "FAIL", [c.line() for c in checks]


def test_optional_lines_are_shown_and_their_absence_is_not_a_failure(console):
    text = as_h100(console, {2: 90.0, 3: 133.0, 4: 177.0})
    extra = text.replace("compile_warmup_ms:", "precision:bf16 reason:cuda autocast\ncompile_warmup_ms:")
    extra += "fit: levels:int7/int5 model_bytes:1234\nexport shards:1 time_ms:12\n"
    checks = gpu_check.verdict(gpu_check.parse(extra), 0, GPU_PROBE)
    info = [c.detail for c in checks if c.name == "log"]
    assert "precision:bf16 reason:cuda autocast" in info and any(i.startswith("fit:") for i in info)
    assert not [c for c in checks if c.status == "FAIL"]
    no_calib = re.sub(r"^(quant method|gptq_reserve).*\n", "", text, flags=re.M)
    assert statuses(gpu_check.verdict(gpu_check.parse(no_calib), 0, GPU_PROBE))["calibration"] == "N/A"


def test_a_nonzero_exit_fails_unless_it_is_the_demo_artifact_over_budget(console):
    assert statuses(gpu_check.verdict(gpu_check.parse(console), 1))["exit code"] == "FAIL"
    over = console + "artifact_over_budget excess_bytes:12 (not a valid submission; the evals still run)\n"
    assert statuses(gpu_check.verdict(gpu_check.parse(over), 1))["exit code"] == "WARN"


def test_an_empty_console_is_a_failure_not_a_crash():
    checks = gpu_check.verdict(gpu_check.parse(""), 124, NO_CUDA_PROBE)
    assert statuses(checks)["run"] == "FAIL" and statuses(checks)["exit code"] == "FAIL"


def test_summarize_cli_prints_one_verdict_and_exits_nonzero_on_fail(tmp_path):
    probe = tmp_path / "probe.txt"
    probe.write_text(NO_CUDA_PROBE)
    out = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "summarize", "--console",
                          str(FIXTURE), "--rc", "0", "--probe", str(probe), "--wall-seconds", "300"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert out.stdout.splitlines()[-1].startswith("gpu_check:FAIL fails:1 ")  # the probe: no CUDA device
    assert re.search(r"^INFO wall time: 300 s$", out.stdout, re.M)


def test_the_script_stops_after_the_probe_without_a_gpu(tmp_path):
    """Without GPU_CHECK_ALLOW_CPU the check ends after the probe, with its summary in $OUT."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "PYTHONPATH")}
    out = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], env={**env, "OUT": str(tmp_path)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    summary = (tmp_path / "gpu_check_summary.txt").read_text()
    assert "FAIL probe: no CUDA device" in summary and summary.rstrip().splitlines()[-1].startswith("gpu_check:FAIL")
