"""Section 12 (TRAINING) as a whole: the clock-check cadence, repeated runs, the record's 8 ranks against one process,
and the end-of-training check that every rank holds the same weights."""

from __future__ import annotations

import re
import sys

import pytest

from test_environment import site_env
from test_main import SCRIPT, run, tiny_env, torchrun_cmd
from train_gpt import CLOCK_CHECK_STEPS, steps_to_next_check


@pytest.mark.parametrize("step_ms, ms_left, want", [
    (10.0, [], CLOCK_CHECK_STEPS),  # no budget, no periodic checkpoint: the longest interval
    (0.0, [], CLOCK_CHECK_STEPS),
    (0.0, [5000.0], 1),  # no step time measured yet: check after one step
    (10.0, [5000.0], CLOCK_CHECK_STEPS),
    (10.0, [100.0], 5),  # half of the 10 steps that fit
    (10.0, [100.0, 39.0], 1),  # the nearest deadline counts
    (10.0, [-3.0], 1),  # past a deadline: every step
])
def test_steps_to_next_check(step_ms, ms_left, want):
    assert steps_to_next_check(step_ms, ms_left) == want


def exact_bpb(stdout: str) -> dict[str, float]:
    return {name: float(bpb) for name, bpb in re.findall(r"^(\w+)_exact val_loss:\S+ val_bpb:(\S+)$", stdout, re.M)}


def lines(stdout: str, *prefixes: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(prefixes)]


def test_repeated_runs_train_the_same_weights(tmp_path, demo_subset):
    """The loop reads the clock every few steps and a worker thread reads the data: neither changes what is trained."""
    env = tiny_env(demo_subset, EVAL_STRIDE="0", QUANT_METHOD="clip")
    first, second = (run([sys.executable, SCRIPT], {**env, "RUN_ID": name}, tmp_path) for name in ("a", "b"))
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-3000:] + second.stderr[-3000:]
    digests = [re.findall(r"^(?:weights_sha256:\w+|\w+_exact .*)$", out.stdout, re.M) for out in (first, second)]
    assert digests[0] == digests[1] and len(digests[0]) == 3  # the digest, final_float_exact, final_roundtrip_exact


def test_eight_gloo_ranks_match_one_process(tmp_path, demo_subset):
    """The record's world size: 8 ranks with one micro-step each consume exactly the spans that one process takes in
    8 accumulation steps (and 2 calibration batches per rank the 16 of one process), so training, export and every
    eval must agree up to float summation order (8 gradients all-reduced instead of accumulated in sequence). The
    mixer learns every MIXER_UPDATE_TARGETS targets whatever the world size, so the eval knobs stay as they are."""
    env = tiny_env(demo_subset, GRAD_ACCUM_STEPS="0", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="100")
    one = run([sys.executable, SCRIPT], {**env, "RUN_ID": "one", "GPTQ_CALIB_BATCHES": "16"}, tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8", SCRIPT]
    eight = run(cmd, {**env, "RUN_ID": "eight", "GPTQ_CALIB_BATCHES": "2"}, tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert eight.returncode == 0, eight.stderr[-3000:]  # torchrun exits 0 only when every rank did
    assert re.search(r"^world_size:8 .* grad_accum_steps:1 ", eight.stdout, re.M)
    assert re.search(r"^world_size:1 .* grad_accum_steps:8 ", one.stdout, re.M)
    assert "weights_identical_across_ranks:1" in eight.stdout
    same = ("model_params:", "prog_depth:switch", "swa:", "quant method:gptq calib:train batches:")
    assert [re.sub(r"batches:\d+ .*", "", x) for x in lines(eight.stdout, *same)] == \
        [re.sub(r"batches:\d+ .*", "", x) for x in lines(one.stdout, *same)]
    bpb_one, bpb_eight = exact_bpb(one.stdout), exact_bpb(eight.stdout)
    assert set(bpb_one) == set(bpb_eight) == {"final_float", "final_roundtrip", "final_sliding_window", "final_mixer"}
    print({k: (bpb_one[k], bpb_eight[k]) for k in bpb_one})
    for name in bpb_one:
        assert bpb_eight[name] == pytest.approx(bpb_one[name], abs=5e-4), name
    pattern = r"^step:\d+/12 train_loss:(\S+) "
    train_loss = [[float(v) for v in re.findall(pattern, out.stdout, re.M)] for out in (one, eight)]
    assert len(train_loss[0]) == 10 and train_loss[1] == pytest.approx(train_loss[0], abs=2e-3)


def test_ranks_with_different_weights_fail_loudly(tmp_path, demo_subset):
    """A different SEED per rank gives every rank its own initial weights: the end-of-training check must catch it."""
    same = run(torchrun_cmd(), tiny_env(demo_subset, ITERATIONS="2", EVAL_STRIDE="0"), tmp_path)
    assert same.returncode == 0 and "weights_identical_across_ranks:1" in same.stdout, same.stderr[-3000:]
    env = site_env(tmp_path, tiny_env(demo_subset, ITERATIONS="2", EVAL_STRIDE="0", RUN_ID="split"),
                   SEED_PLUS_RANK="1")
    out = run(torchrun_cmd(), env, tmp_path)
    assert out.returncode != 0
    assert re.search(r"^weights_identical_across_ranks:0$", out.stdout, re.M)
    assert re.search(r"^weights_differ ranks:1 ", out.stdout, re.M)
    assert "final_float" not in out.stdout and not (tmp_path / "logs" / "split.ptz").exists()
