"""Section 8's Muon and section 3's precision decision: torch.optim.Muon's update reproduced (bf16 Newton-Schulz),
the fp32 path against float64, sharding over 2 gloo ranks, and AUTOCAST=auto from an injected probe result."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch

import train_gpt
from conftest import REPO, tiny_config

needs_torch_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this torch has no torch.optim.Muon")
# Shapes of the tiny model's matrices, repeated like the 3 shared blocks: equal shapes batch together, and a tall
# (64, 32) shares a batch with the wide (32, 64).
SHAPES = [(32, 32), (16, 32), (64, 32), (32, 64)] * 3 + [(48, 32)]
HYPER = dict(lr=0.05, momentum=0.9, weight_decay=0.5, ns_steps=5)


def random_matrices(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.2) for shape in SHAPES]


def run_steps(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int = 3) -> None:
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def assert_updates_close(ours, theirs, start, rel):
    for p, q, p0 in zip(ours, theirs, start):
        delta, want = p.detach() - p0, q.detach() - p0
        assert ((delta - want).norm() / want.norm()).item() < rel, tuple(p.shape)


@needs_torch_muon
def test_matches_torch_muon_on_random_matrices():
    ours, theirs = random_matrices(0), random_matrices(0)
    start = [p.detach().clone() for p in ours]
    run_steps(train_gpt.Muon(ours, **HYPER), ours)
    run_steps(torch.optim.Muon(theirs, lr=0.05, momentum=0.9, weight_decay=0.5, ns_steps=5, nesterov=True,
                               adjust_lr_fn="original"), theirs)
    # Both bf16 (bitwise equal on this CPU; a backend may round batched matmuls differently, hence bf16's 1 %);
    # dropping nesterov is off by >= 17 %, the aspect scale or the weight decay by more.
    assert_updates_close(ours, theirs, start, rel=1e-2)


@needs_torch_muon
def test_matches_torch_muon_on_one_real_step_of_the_tiny_model():
    cfg = tiny_config(matrix_lr=0.05, muon_wd=0.5, muon_momentum_warmup_start=0.9)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(train_gpt.GPT(cfg))
    ids = torch.randint(0, cfg.vocab_size, (4, cfg.train_seq_len), generator=torch.Generator().manual_seed(1))
    for model in models:
        model(ids, cfg.num_repeats, ids).mean().backward()
    ours = train_gpt.build_optimizers(models[0], cfg, fused=False)["muon"]
    params = [p for g in ours.param_groups for p in g["params"]]
    theirs_params = [dict(models[1].named_parameters())[n] for n, p in models[0].named_parameters()
                     if any(p is q for q in params)]
    start = [p.detach().clone() for p in params]
    ours.step()
    torch.optim.Muon(theirs_params, lr=0.05, momentum=0.9, weight_decay=0.5, ns_steps=5, nesterov=True,
                     adjust_lr_fn="original").step()
    assert_updates_close(params, theirs_params, start, rel=1e-2)


def float64_muon(params: list[torch.Tensor], grads: list[list[torch.Tensor]], lr, momentum, weight_decay, ns_steps):
    """The documented update, one matrix at a time, in float64."""
    a, b, c = train_gpt.NS_COEFFICIENTS
    params = [p.detach().double().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for step_grads in grads:
        for p, g, buf in zip(params, step_grads, bufs):
            g = g.double()
            buf.mul_(momentum).add_((1 - momentum) * g)
            x = (1 - momentum) * g + momentum * buf
            tall = x.shape[0] > x.shape[1]
            x = x.T if tall else x
            x = x / max(x.norm().item(), 1e-7)
            for _ in range(ns_steps):
                gram = x @ x.T
                x = a * x + (b * gram + c * gram @ gram) @ x
            p.mul_(1 - lr * weight_decay).sub_(lr * math.sqrt(max(1, p.shape[0] / p.shape[1])) * (x.T if tall else x))
    return params


def test_fp32_newton_schulz_matches_float64():
    rt = train_gpt.Runtime(tiny_config(device="cpu", autocast="0"), {})
    assert rt.precision == "fp32" and rt.compute_dtype == torch.float32
    params = random_matrices(3)
    opt = train_gpt.Muon(params, **HYPER, rt=rt)
    assert opt.ns_dtype == torch.float32
    gen = torch.Generator().manual_seed(7)
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(3)]
    start = [p.detach().clone() for p in params]
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    want = float64_muon(start, grads, **HYPER)
    for p, w, p0 in zip(params, want, start):
        delta, want_delta = p.detach().double() - p0.double(), w - p0.double()
        assert ((delta - want_delta).norm() / want_delta.norm()).item() < 1e-4, tuple(p.shape)


def test_parameters_without_gradients_are_left_alone():
    params = random_matrices(4)
    before = [p.detach().clone() for p in params]
    opt = train_gpt.Muon(params, **HYPER)
    params[0].grad = torch.randn(params[0].shape)
    opt.step()
    assert not torch.equal(params[0], before[0])
    assert all(torch.equal(p, b) for p, b in zip(params[1:], before[1:]))
    assert list(opt.state) == [params[0]]


def test_buckets_batch_equal_shapes_and_split_them_over_ranks():
    opt = train_gpt.Muon(random_matrices(0), **HYPER)
    opt.world = 2
    sizes = [(tuple(sorted(ps[0].shape)), len(ps), share) for ps, share in opt.buckets()]
    assert sizes == [((32, 32), 3, 2), ((16, 32), 3, 2), ((32, 64), 6, 3), ((32, 48), 1, 1)]


TWO_RANK_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_config  # puts the repository on sys.path
import train_gpt
from test_muon import HYPER, random_matrices, run_steps
torch.set_num_threads(1)
rt = train_gpt.Runtime(tiny_config(device="cpu", autocast=sys.argv[1], run_id="muon"), os.environ)
sharded, whole = random_matrices(5), random_matrices(5)
run_steps(train_gpt.Muon(sharded, **HYPER, rt=rt), sharded)
single = train_gpt.Muon(whole, **HYPER)
single.ns_dtype = rt.compute_dtype
run_steps(single, whole)
gap = max((a - b).abs().max().item() for a, b in zip(sharded, whole))
open(f"rank{{rt.rank}}.txt", "w").write(f"precision:{{rt.precision}} max_abs_diff:{{gap:.3e}}")
rt.shutdown(0)
"""


@pytest.mark.parametrize("autocast", ["0", "1"])
def test_two_gloo_ranks_sharded_equals_unsharded(autocast, tmp_path):
    script = tmp_path / "muon_two.py"
    script.write_text(TWO_RANK_SCRIPT.format(tests=str(REPO / "tests")))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), autocast], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    for rank in (0, 1):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        precision, gap = re.fullmatch(r"precision:(\w+) max_abs_diff:(\S+)", text).groups()
        assert precision == ("bf16" if autocast == "1" else "fp32")
        assert float(gap) <= 1e-6, gap  # bitwise equal on this CPU; a backend may round a smaller batch differently


# --- the precision decision (section 3) ---

@pytest.mark.parametrize("bf16_ms, fp32_ms, want", [
    (0.09, 0.53, "bf16"),  # AMX (this project's CPU): bf16 6x faster
    (0.45, 0.90, "bf16"),  # AVX512-BF16 without AMX: ~2x
    (56.7, 4.6, "fp32"),  # Zen 3, AVX2 only: bf16 emulated, 12x slower (the figure)
    (1.8, 1.2, "fp32"),  # AVX-512 without bf16 (Skylake): emulated, slower
    (1.0, 1.1, "fp32"),  # a tie goes to the more exact fp32
])
def test_cpu_probe_decision(bf16_ms, fp32_ms, want):
    precision, reason = train_gpt.pick_cpu_precision(bf16_ms, fp32_ms)
    assert precision == want
    assert reason == f"cpu_matmul_probe bf16_ms:{bf16_ms:.3f} fp32_ms:{fp32_ms:.3f}"


@pytest.mark.parametrize("setting, want", [("1", "bf16"), ("0", "fp32")])
def test_autocast_forces_the_precision(setting, want):
    rt = train_gpt.Runtime(tiny_config(device="cpu", autocast=setting), {})
    assert (rt.precision, rt.precision_reason) == (want, f"AUTOCAST={setting}")
    assert rt.use_autocast == (want == "bf16")
    assert train_gpt.build_optimizers(train_gpt.GPT(tiny_config()), tiny_config(), False, rt)["muon"].ns_dtype == (
        torch.bfloat16 if want == "bf16" else torch.float32)


def test_auto_probes_on_cpu_and_every_consumer_follows():
    rt = train_gpt.Runtime(tiny_config(device="cpu"), {})
    assert rt.precision in ("bf16", "fp32") and rt.precision_reason.startswith("cpu_matmul_probe bf16_ms:")
    assert rt.compute_dtype == (torch.bfloat16 if rt.precision == "bf16" else torch.float32)
    with rt.autocast():  # the evals, GPTQ calibration, TTT and the compile priming all run under rt.autocast()
        assert torch.is_autocast_enabled("cpu") == (rt.precision == "bf16")


# --- the torch floor ---

@pytest.mark.parametrize("version, ok", [("2.4.1+cu121", False), ("2.5.0", True), ("2.13.0", True),
                                         ("2.10.0a0+git1234", True), ("1.13.1", False)])
def test_torch_version_problem(version, ok):
    problem = train_gpt.torch_version_problem(version)
    assert (problem == "") == ok
    if not ok:
        assert problem == f"torch {version} found, this script needs torch>=2.5 (SDPA enable_gqa)"


def test_an_old_torch_ends_the_run_with_one_line_and_exit_2(tmp_path):
    code = ("import runpy, sys, torch; torch.__version__ = '2.4.1'; "
            f"sys.argv = [{str(REPO / 'train_gpt.py')!r}]; runpy.run_path(sys.argv[0], run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == "config_error: torch 2.4.1 found, this script needs torch>=2.5 (SDPA enable_gqa)\n"
