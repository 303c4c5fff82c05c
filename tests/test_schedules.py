"""Section 4 (SCHEDULES): LR warmup/warmdown, Muon momentum, progressive depth, SWA cadence."""

from __future__ import annotations

import pytest

import train_gpt
from train_gpt import Config, lr_scale, muon_momentum_at, repeats_at, run_progress, swa_due


def wallclock_cfg(**kw) -> Config:
    base = dict(max_wallclock_seconds=100.0, warmdown_iters=10, lr_warmup_steps=0)
    base.update(kw)
    return Config(**base)


def step_cfg(**kw) -> Config:
    base = dict(max_wallclock_seconds=0.0, iterations=100, warmdown_iters=20, lr_warmup_steps=0)
    base.update(kw)
    return Config(**base)


# --- LR warmup ---


@pytest.mark.parametrize("make_cfg, elapsed", [(wallclock_cfg, 1.0), (step_cfg, 0.0)])
def test_warmup_ramp(make_cfg, elapsed):
    cfg = make_cfg(lr_warmup_steps=5)
    # Early in the run (far from any warmdown) the scale is the pure warmup ramp (step + 1) / LR_WARMUP_STEPS.
    got = [lr_scale(cfg, s, elapsed * max(s, 1)) for s in range(8)]
    assert got == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0], abs=1e-12)
    assert got[0] == pytest.approx(1 / cfg.lr_warmup_steps)
    assert max(got) == 1.0


def test_no_warmup_when_lr_warmup_steps_is_zero():
    assert lr_scale(wallclock_cfg(lr_warmup_steps=0), 0, 0.0) == 1.0
    assert lr_scale(step_cfg(lr_warmup_steps=0), 0, 0.0) == 1.0


def test_default_warmup_is_50_steps():
    cfg = Config()
    assert lr_scale(cfg, 0, 0.0) == pytest.approx(1 / 50)
    assert lr_scale(cfg, 49, 49 * 100.0) == pytest.approx(1.0)


# --- wallclock warmdown ---


def test_wallclock_warmdown_boundaries():
    cfg = wallclock_cfg()  # budget 100 s, WARMDOWN_ITERS 10
    step_ms = 500.0  # every step took 0.5 s, so the warmdown lasts 10 x 0.5 s = 5 s
    # Far from the end: full LR.
    assert lr_scale(cfg, 100, 100 * step_ms) == 1.0
    # remaining = 5.5 s > 5 s and remaining = 5 s exactly: still 1.
    assert lr_scale(cfg, 189, 189 * step_ms) == 1.0
    assert lr_scale(cfg, 190, 190 * step_ms) == pytest.approx(1.0)
    # Inside: exactly remaining / (WARMDOWN_ITERS x mean step).
    for step in (191, 192, 195, 198, 199):
        elapsed = step * step_ms
        remaining = 100_000.0 - elapsed
        assert lr_scale(cfg, step, elapsed) == pytest.approx(remaining / (10 * step_ms), rel=1e-12)
    assert lr_scale(cfg, 192, 192 * step_ms) == pytest.approx(0.8)
    # At (and past) the budget: 0.
    assert lr_scale(cfg, 200, 200 * step_ms) == 0.0
    assert lr_scale(cfg, 201, 201 * step_ms) == 0.0


def test_wallclock_warmdown_uses_the_mean_step_time():
    cfg = wallclock_cfg()
    # Same elapsed time (96 s, 4 s left), different step counts: the window is WARMDOWN_ITERS mean steps.
    assert lr_scale(cfg, 96, 96_000.0) == pytest.approx(0.4)  # mean 1 s/step, 10 s window, 4 s left
    assert lr_scale(cfg, 192, 96_000.0) == pytest.approx(0.8)  # mean 0.5 s/step, 5 s window
    assert lr_scale(cfg, 960, 96_000.0) == 1.0  # mean 0.1 s/step, 1 s window not reached yet


def test_wallclock_scale_is_monotone_within_warmdown():
    cfg = wallclock_cfg()
    scales = [lr_scale(cfg, s, s * 500.0) for s in range(150, 205)]
    assert all(a >= b for a, b in zip(scales, scales[1:]))
    assert scales[0] == 1.0 and scales[-1] == 0.0


def test_wallclock_warmup_and_warmdown_multiply():
    cfg = wallclock_cfg(lr_warmup_steps=1000)
    # step 191 at 0.5 s/step: warmdown 0.9, warmup 192/1000.
    assert lr_scale(cfg, 191, 191 * 500.0) == pytest.approx(0.9 * 192 / 1000)


# --- step-mode warmdown ---


def test_step_mode_warmdown_is_linear_over_the_last_warmdown_iters():
    cfg = step_cfg()  # ITERATIONS 100, WARMDOWN_ITERS 20
    elapsed = 123456.0  # ignored in step mode
    assert lr_scale(cfg, 0, elapsed) == 1.0
    assert lr_scale(cfg, 80, elapsed) == 1.0
    for step in range(80, 101):
        assert lr_scale(cfg, step, elapsed) == pytest.approx((100 - step) / 20, abs=1e-12)
    assert lr_scale(cfg, 90, elapsed) == pytest.approx(0.5)
    assert lr_scale(cfg, 100, elapsed) == 0.0
    assert lr_scale(cfg, 150, elapsed) == 0.0


def test_step_mode_without_warmdown():
    cfg = step_cfg(warmdown_iters=0)
    assert lr_scale(cfg, 99, 0.0) == 1.0


# --- Muon momentum ---


def test_muon_momentum_warmup():
    cfg = Config()
    assert muon_momentum_at(cfg, 0) == pytest.approx(0.85)
    assert muon_momentum_at(cfg, 250) == pytest.approx(0.90)
    assert muon_momentum_at(cfg, 100) == pytest.approx(0.87)
    assert muon_momentum_at(cfg, 500) == pytest.approx(0.95)
    assert muon_momentum_at(cfg, 5000) == pytest.approx(0.95)
    assert muon_momentum_at(Config(muon_momentum_warmup_steps=0), 0) == pytest.approx(0.95)


# --- progressive depth ---


@pytest.mark.parametrize("progress, reps", [
    (0.0, 2), (0.1, 2), (0.2999, 2), (0.30, 3), (0.40, 3), (0.4999, 3), (0.50, 4), (0.9, 4), (1.0, 4), (1.5, 4),
])
def test_repeats_at_phase_boundaries(progress, reps):
    assert repeats_at(Config(), progress) == reps


def test_repeats_at_four_hour_schedule():
    cfg = Config(num_repeats=5, prog_depth="0.3:2,0.5:3,0.75:4,1.0:5")
    assert [repeats_at(cfg, p) for p in (0.0, 0.3, 0.5, 0.74, 0.75, 1.0)] == [2, 3, 4, 4, 5, 5]


def test_run_progress_wallclock_mode():
    cfg = Config(max_wallclock_seconds=600.0)
    assert run_progress(cfg, 0, 0.0) == 0.0
    assert run_progress(cfg, 7, 180_000.0) == pytest.approx(0.30)  # the step count does not matter
    assert run_progress(cfg, 99999, 180_000.0) == pytest.approx(0.30)
    assert run_progress(cfg, 1, 600_000.0) == 1.0
    assert run_progress(cfg, 1, 900_000.0) == 1.0


def test_run_progress_step_mode_advances_depth():
    # The reference stayed at the first phase (2 repeats) for ever when MAX_WALLCLOCK_SECONDS=0.
    cfg = Config(max_wallclock_seconds=0.0, iterations=1000)
    assert run_progress(cfg, 300, 1e9) == pytest.approx(0.3)  # the elapsed time does not matter
    assert run_progress(cfg, 2000, 0.0) == 1.0
    depth = [repeats_at(cfg, run_progress(cfg, step, 0.0)) for step in (0, 299, 300, 499, 500, 999, 1000)]
    assert depth == [2, 2, 3, 3, 4, 4, 4]


def test_wallclock_depth_follows_time():
    cfg = Config(max_wallclock_seconds=10.0)
    depth = [repeats_at(cfg, run_progress(cfg, 5, ms)) for ms in (0.0, 2999.0, 3000.0, 4999.0, 5000.0, 10_000.0)]
    assert depth == [2, 2, 3, 3, 4, 4]


# --- SWA cadence ---


def test_swa_due_needs_every_condition():
    cfg = Config()  # SWA_EVERY 30, SWA_START_FRAC 0.6, NUM_REPEATS 4
    assert swa_due(cfg, 3000, 4, 0.5)
    assert swa_due(cfg, 30, 4, 0.0)
    assert not swa_due(cfg, 3000, 3, 0.5)  # not at full depth
    assert not swa_due(cfg, 3000, 2, 0.5)
    assert not swa_due(cfg, 3000, 4, 0.6)  # scale must be strictly below SWA_START_FRAC
    assert not swa_due(cfg, 3000, 4, 0.9)
    assert not swa_due(cfg, 3001, 4, 0.5)  # off cadence
    assert not swa_due(cfg, 3015, 4, 0.5)
    assert not swa_due(Config(swa_enabled=False), 3000, 4, 0.5)


def test_swa_due_cadence_and_threshold_follow_config():
    cfg = Config(swa_every=7, swa_start_frac=0.25)
    hits = [s for s in range(1, 50) if swa_due(cfg, s, 4, 0.2)]
    assert hits == [7, 14, 21, 28, 35, 42, 49]
    assert not swa_due(cfg, 7, 4, 0.3)
    assert swa_due(train_gpt.Config(num_repeats=5, prog_depth="1.0:5"), 30, 5, 0.1)
    assert not swa_due(train_gpt.Config(num_repeats=5, prog_depth="1.0:5"), 30, 4, 0.1)
