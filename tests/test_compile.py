"""The compiled path: graph breaks at any depth are caught on CPU before an entrant pays for a GPU."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

import train_gpt
from conftest import REPO, tiny_config
from test_main import tiny_env


@pytest.mark.parametrize("repeats", [1, 2, 3, 4])
def test_fullgraph_trace_at_every_depth_train_and_eval(repeats):
    """Dynamo + AOT autograd trace the whole forward/backward with fullgraph=True (a graph break raises)."""
    torch._dynamo.reset()
    cfg = tiny_config()
    torch.manual_seed(0)
    model = train_gpt.GPT(cfg)
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.train_seq_len))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = compiled(ids, repeats, ids).mean()
        eager_loss = model(ids, repeats, ids).mean()
    loss.backward()
    assert torch.allclose(loss, eager_loss, atol=1e-5)
    assert all(p.grad is not None for n, p in model.named_parameters() if "cross_repeat" not in n or repeats > 1)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = compiled(ids, repeats)
    assert logits.shape == (2, cfg.train_seq_len, cfg.vocab_size) and logits.dtype == torch.float32


@pytest.mark.parametrize("autocast", ["0", "1"])
def test_compiled_run_primes_every_graph_before_the_clock(tmp_path, demo_subset, autocast):
    """A real inductor run (COMPILE=1) on one depth: priming happens before training and nothing recompiles after.

    One depth keeps this to two inductor graphs (train + eval); the trace test above covers every depth. Both
    precisions: AUTOCAST=auto picks fp32 on CPUs without bf16 units, and inductor's fp32 CPU code once crashed
    (heap corruption) on a zero-offset slice of the RoPE tables that bf16 runs never exercised.
    """
    # EVAL_SEQ_LEN = TRAIN_SEQ_LEN and EVAL_BATCH_SEQS = eval rows (32): the final sliding eval reuses the eval graph.
    env = tiny_env(demo_subset, COMPILE="1", PROG_DEPTH="1.0:4", ITERATIONS="4", VAL_LOSS_EVERY="2",
                   TORCH_LOGS="recompiles", OMP_NUM_THREADS="2", EVAL_SEQ_LEN="32", EVAL_STRIDE="8",
                   AUTOCAST=autocast)
    out = subprocess.run([sys.executable, str(REPO / "train_gpt.py")], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"^world_size:1 .* compile:1 ", out.stdout, re.M)
    warmup_ms = int(re.search(r"^compile_warmup_ms:(\d+)", out.stdout, re.M).group(1))
    assert warmup_ms > 0
    # Priming compiles the train graph, then recompiles once for the eval (grad-mode) graph; any further compile
    # would have happened inside the timed loop or an eval.
    assert out.stderr.count("Recompiling function forward") == 1, out.stderr[-3000:]
    # Muon's Newton-Schulz: one graph per bucket of equal shapes, all primed; one more would be a timed-loop compile.
    cfg = train_gpt.Config.from_env(env)
    buckets = train_gpt.build_optimizers(train_gpt.GPT(cfg), cfg, False)["muon"].buckets()
    assert len(buckets) == 3 and out.stderr.count("Recompiling function newton_schulz") == len(buckets) - 1
    assert re.search(r"^final_float_exact val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8}$", out.stdout, re.M)
    assert re.search(r"^final_mixer_exact val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8}$", out.stdout, re.M)


@pytest.mark.parametrize("shape", ["1204", "456"])
def test_fullgraph_trace_of_the_seed_shapes(shape):
    """Lanes, U-Net skips, the bigram hash, V-embeddings and the mini recurrence trace without graph breaks too."""
    from test_presets import TINY_1204, TINY_456
    torch._dynamo.reset()
    cfg = tiny_config(**(TINY_1204 if shape == "1204" else TINY_456))
    torch.manual_seed(0)
    model = train_gpt.GPT(cfg)
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.train_seq_len))
    for repeats in sorted({r for _, r in cfg.depth_schedule}):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = compiled(ids, repeats, ids).mean()
            eager_loss = model(ids, repeats, ids).mean()
        loss.backward()
        assert torch.allclose(loss, eager_loss, atol=1e-5)
