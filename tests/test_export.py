"""Section 11's shared export: levels chosen to fit BUDGET_BYTES (QUANT_FIT=fit) or to spend its headroom (spend),
against a brute-force search; the real artifact size, what the file reads back, and 1 process vs 2 gloo ranks."""

from __future__ import annotations

import dataclasses
import itertools
import re
import subprocess
import sys

import pytest
import torch

import train_gpt
from conftest import REPO
from test_quant import CpuRuntime, trained_like
from train_gpt import (code_cost, choose_levels, collect_hessians, export_artifact, quantize_tensor, tensor_levels,
                       unpack_artifact)

CODE_BYTES = 100_000  # stands for the script's bytes: the budget counts them too


def calibrated(cfg):
    model = trained_like(cfg)
    ids = torch.randint(cfg.vocab_size, (4, cfg.train_seq_len), generator=torch.Generator().manual_seed(0))
    return model, collect_hessians(CpuRuntime(), model, [ids])


@pytest.fixture(scope="module")
def tiny_low():
    """A tiny model at low configured levels (7/5), so every tensor has 2-3 rungs (3, 5, 7): cheap to search."""
    from conftest import tiny_config
    cfg = tiny_config(quant_levels=7, mlp_quant_levels=5)
    model, hessians = calibrated(cfg)
    blob, _, _ = export_artifact(dataclasses.replace(cfg, quant_fit="off"), CpuRuntime(), model, hessians,
                                 frozenset(), CODE_BYTES)
    return cfg, model, hessians, len(blob)


def replay(start: dict[str, int], lines: list[str]) -> dict[str, int]:
    levels = dict(start)
    for line in lines:
        if m := re.fullmatch(r"fit:(lower|raise) name:(\S+) levels:(\d+)->(\d+) bytes:\S+ err:\S+", line):
            assert levels[m[2]] == int(m[3])
            levels[m[2]] = int(m[4])
    return levels


def test_fit_meets_a_binding_budget_and_the_file_holds_the_logged_levels(tiny_low):
    cfg, model, hessians, configured = tiny_low
    fit = dataclasses.replace(cfg, quant_fit="fit", budget_bytes=CODE_BYTES + int(0.97 * configured))
    rt = CpuRuntime()
    blob, sizes, fallbacks = export_artifact(fit, rt, model, hessians, frozenset(), CODE_BYTES)
    assert CODE_BYTES + len(blob) <= fit.budget_bytes < CODE_BYTES + configured and fallbacks == 0
    assert any(line.startswith("fit:lower") for line in rt.lines)
    assert re.search(r"^fit:check round:\d+ predicted_bytes:\d+ real_bytes:\d+", rt.lines[0])
    want = replay(tensor_levels(cfg, model, hessians), rt.lines)
    _, stored = unpack_artifact(blob)
    assert {t.name: t.levels for t in stored} == {n: L for n, L in want.items() if n in {t.name for t in stored}}
    assert any(t.levels < 5 for t in stored)


def test_spend_raises_levels_and_stays_under_the_budget_minus_the_margin(tiny_low):
    cfg, model, hessians, configured = tiny_low
    spend = dataclasses.replace(cfg, quant_fit="spend", quant_fit_max_levels=11, quant_fit_margin=500,
                                budget_bytes=CODE_BYTES + configured + 3000)
    rt = CpuRuntime()
    blob, _, _ = export_artifact(spend, rt, model, hessians, frozenset(), CODE_BYTES)
    assert CODE_BYTES + len(blob) <= spend.budget_bytes - spend.quant_fit_margin
    assert len(blob) > configured  # the headroom was spent
    _, stored = unpack_artifact(blob)
    levels = {t.name: t.levels for t in stored}
    assert levels == replay(tensor_levels(cfg, model, hessians), [ln for ln in rt.lines if ln.startswith("fit:")]) | {
        n: L for n, L in levels.items() if n not in hessians}
    assert max(levels.values()) == 11 and all(L <= 11 for L in levels.values())


def test_lowest_rungs_that_do_not_fit_keep_the_configured_artifact(tiny_low):
    cfg, model, hessians, configured = tiny_low
    rt = CpuRuntime()
    blob, _, _ = export_artifact(dataclasses.replace(cfg, budget_bytes=CODE_BYTES + 1000), rt, model, hessians,
                                 frozenset(), CODE_BYTES)
    assert len(blob) == configured and any(line.startswith("fit:impossible") for line in rt.lines)


def test_greedy_choice_is_within_one_percent_of_brute_force(tiny_low):
    """On 7 tensors x 3 rungs (2,187 allocations), at several budgets: the greedy's total error against the best
    allocation whose size-model bytes fit the same limit."""
    cfg, model, hessians, _ = tiny_low
    params = dict(model.named_parameters())
    names = sorted(hessians)[::3][:7]
    costs = {}
    for name in names:
        p = params[name].detach()
        costs[name] = {L: code_cost(quantize_tensor(cfg, name, p, "q_attn", L, hessians[name])[0], p, hessians[name])
                       for L in (3, 5, 7)}
    start = dict.fromkeys(names, 7)
    full = sum(costs[n][7][1] for n in names)
    floor = sum(costs[n][3][1] for n in names)
    assert choose_levels(costs, start, floor - 1)[0] is None
    for frac in (0.2, 0.5, 0.8):
        limit = floor + frac * (full - floor)
        levels, _ = choose_levels(costs, start, limit)
        greedy = sum(costs[n][levels[n]][0] for n in names)
        assert sum(costs[n][levels[n]][1] for n in names) <= limit
        best = min(sum(costs[n][L][0] for n, L in zip(names, combo)) for combo in itertools.product((3, 5, 7),
                   repeat=len(names)) if sum(costs[n][L][1] for n, L in zip(names, combo)) <= limit)
        assert greedy <= 1.01 * best, (frac, greedy / best)
        spent, _ = choose_levels(costs, dict.fromkeys(names, 3), limit)  # from below, raising
        assert sum(costs[n][spent[n]][1] for n in names) <= limit


def test_quant_fit_knobs_are_validated():
    with pytest.raises(train_gpt.ConfigError, match="QUANT_FIT must be one of off, fit, spend"):
        train_gpt.Config.from_env({"QUANT_FIT": "max"})
    with pytest.raises(train_gpt.ConfigError, match="BUDGET_BYTES must be > 0"):
        train_gpt.Config.from_env({"BUDGET_BYTES": "0"})


def bench_run(tmp_path, demo_subset, ranks: int, **env) -> str:
    """bench/export_ranks.py on the same seeded tiny weights and Hessians, in 1 process or 2 gloo ranks."""
    import os
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environ.update(DATA_PATH=demo_subset["data_path"], TOKENIZER_PATH=demo_subset["tokenizer_path"],
                   VOCAB_SIZE="512", MODEL_DIM="32", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="2",
                   TRAIN_SEQ_LEN="32", TRAIN_BATCH_TOKENS="256", GPTQ_CALIB_BATCHES="2", COMPILE="0",
                   OMP_NUM_THREADS="1", RUN_ID=f"export{ranks}", **env)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    out = subprocess.run([sys.executable, *launcher, str(REPO / "bench" / "export_ranks.py")], env=environ,
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_two_gloo_ranks_write_the_bytes_of_one_process(tmp_path, demo_subset):
    configured = bench_run(tmp_path, demo_subset, 1, QUANT_FIT="off")
    size = int(re.search(r"^bench_export world:1 time_ms:\d+ bytes:(\d+) ", configured, re.M)[1])
    code = len((REPO / "train_gpt.py").read_bytes())
    budget = dict(QUANT_FIT="fit", BUDGET_BYTES=str(code + int(0.98 * size)))
    one, two = (bench_run(tmp_path, demo_subset, ranks, **budget) for ranks in (1, 2))
    digest = [re.search(r"^bench_export world:\d time_ms:\d+ bytes:(\d+) sha256:(\w+)", o, re.M) for o in (one, two)]
    assert digest[0][2] == digest[1][2] and int(digest[0][1]) <= 0.98 * size
    assert [ln for ln in one.splitlines() if ln.startswith("fit:")] == [
        ln for ln in two.splitlines() if ln.startswith("fit:")]  # the same choices, logged once


def test_a_run_fits_its_budget_and_logs_the_export_time(tmp_path, demo_subset):
    """A real tiny training run, first at the configured levels (and DRY_RUN's estimate from its last checkpoint),
    then with BUDGET_BYTES 2 % below that size."""
    from test_main import SCRIPT, run, tiny_env
    env = tiny_env(demo_subset, ITERATIONS="4", VAL_LOSS_EVERY="0", EVAL_STRIDE="0", MIXER="off")
    configured = {**env, "QUANT_FIT": "off", "CHECKPOINT_EVERY_SECONDS": "0.001"}  # the last one: the end state
    first = run([sys.executable, SCRIPT], configured, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    line = re.search(r"^artifact code_bytes:\d+ model_bytes:(\d+) total_bytes:(\d+) ", first.stdout, re.M)
    total = int(line[2])
    dry = run([sys.executable, SCRIPT], {**configured, "DRY_RUN": "1", "RESUME": "logs/tiny.ckpt"}, tmp_path)
    estimate = re.search(r"^artifact_estimate code_bytes:\d+ model_bytes:(\d+) ", dry.stdout, re.M)
    assert dry.returncode == 0 and abs(int(estimate[1]) / int(line[1]) - 1) < 0.02, dry.stderr[-3000:]
    assert re.search(r"^export_time train_end_to_artifact_ms:\d+$", first.stdout, re.M)
    budget = total - int(0.02 * (total - len((REPO / "train_gpt.py").read_bytes())))
    out = run([sys.executable, SCRIPT], {**env, "BUDGET_BYTES": str(budget), "RUN_ID": "fit"}, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    line = re.search(rf"^artifact code_bytes:\d+ model_bytes:\d+ total_bytes:(\d+) budget_bytes:{budget} "
                     r"headroom_bytes:(\d+)$", out.stdout, re.M)
    assert line and int(line[1]) <= budget and "fit:lower" in out.stdout and "artifact_over_budget" not in out.stdout
    assert re.search(r"^final_roundtrip_exact ", out.stdout, re.M)


@pytest.mark.parametrize("knobs", [dict(quant_levels=7, mlp_quant_levels=5), dict(quant_high_tensors=5)])
def test_the_estimate_from_weights_is_within_2_percent_of_the_gptq_artifact(knobs):
    """DRY_RUN=1 RESUME=<checkpoint>'s estimate has no calibration data: it rounds to nearest where GPTQ runs."""
    from conftest import tiny_config
    cfg = tiny_config(quant_fit="off", **knobs)
    model, hessians = calibrated(cfg)
    blob, _, _ = export_artifact(cfg, CpuRuntime(), model, hessians, model.recurrent_matrices(), CODE_BYTES)
    assert abs(train_gpt.estimate_from_weights(cfg, model) / len(blob) - 1) < 0.02


def test_dry_run_estimate_reports_the_levels_the_fit_would_choose():
    cfg = train_gpt.Config.from_env({"PRESET": "demo"})
    model = train_gpt.meta_model(cfg)
    configured = train_gpt.estimate_model_bytes(cfg, model)
    assert train_gpt.estimate_fit(cfg, model, CODE_BYTES) == (configured, train_gpt.estimate_fit(cfg, model, 0)[1])
    tight = dataclasses.replace(cfg, budget_bytes=CODE_BYTES + int(0.9 * configured))
    size, levels = train_gpt.estimate_fit(tight, model, CODE_BYTES)
    assert size <= 0.9 * configured and min(levels.values()) < cfg.mlp_quant_levels
    assert train_gpt.estimate_fit(dataclasses.replace(tight, quant_fit="off"), model, CODE_BYTES)[0] is None
    hopeless = dataclasses.replace(tight, budget_bytes=CODE_BYTES + 1000)
    assert train_gpt.estimate_fit(hopeless, model, CODE_BYTES)[0] is None
    spent, raised = train_gpt.estimate_fit(dataclasses.replace(cfg, quant_fit="spend"), model, CODE_BYTES)
    assert spent > configured and max(raised.values()) == 127  # the demo is far under 16 MB: everything goes up
