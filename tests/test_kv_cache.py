"""Incremental decoding (section 7's KVCache) and the self-generated calibration built on it (section 11)."""

from __future__ import annotations

import re
import sys

import pytest
import torch

import train_gpt
from conftest import tiny_config
from test_model import make_model, random_ids
from test_presets import TINY_1204, TINY_456

# The default 3x4 shape (cross-repeat skips, value embeddings, loop embeddings, XSA on the last 4) and the two seed
# shapes: #1204 (mini recurrence, parallel lanes, gated U-Net, bigram hash, smear gate, partial RoPE, LN scale,
# V-embeddings, layer-0 attention off, XSA everywhere) and #456 (additive U-Net, bigram hash, smear gate, relu^2).
SHAPES = {"3x4": {}, "1204": TINY_1204, "456": TINY_456}


def decode(model: train_gpt.GPT, ids: torch.Tensor, repeats: int, chunks: list[int]) -> torch.Tensor:
    """Logits of ids fed through one cache in pieces of the given lengths."""
    cache, out, at = train_gpt.KVCache(ids.size(1)), [], 0
    for n in chunks:
        out.append(model(ids[:, at:at + n], repeats, cache=cache))
        at += n
    assert at == ids.size(1) and cache.length == ids.size(1)
    return torch.cat(out, 1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunks", [[1] * 16, [5, 1, 1, 3, 6]], ids=["token_by_token", "prefill_then_mixed"])
def test_incremental_decoding_gives_the_full_forward_logits(shape, chunks):
    cfg = tiny_config(**SHAPES[shape])
    model = make_model(lambda **o: tiny_config(**SHAPES[shape], **o)).eval()
    ids = random_ids(cfg)
    for repeats in sorted({1, cfg.num_repeats}):
        with torch.no_grad():
            full = model(ids, repeats)
            incremental = decode(model, ids, repeats, chunks)
        assert torch.allclose(incremental, full, atol=1e-5, rtol=1e-5), (incremental - full).abs().max()


def test_the_cache_changes_nothing_but_the_positions_it_is_given(tiny_cfg):
    """A second cache fed the same tokens agrees; logits of a prefix do not depend on what follows (causality)."""
    model = make_model(tiny_cfg).eval()
    ids = random_ids(tiny_cfg())
    with torch.no_grad():
        head = model(ids[:, :7], 4, cache=train_gpt.KVCache(16))
        assert torch.allclose(head, model(ids, 4)[:, :7], atol=1e-5)


class CpuRuntime:
    """What calibration_batches needs of Runtime, for one CPU process standing in as rank `rank` of `world_size`."""
    device = torch.device("cpu")

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size, self.lines = rank, world_size, []

    def autocast(self):
        return torch.autocast("cpu", enabled=False)

    def all_max(self, *values):
        return list(values)

    def log(self, line):
        self.lines.append(line)


class Batches:
    local_tokens = 3 * 16  # a training micro-batch of 3 rows at TRAIN_SEQ_LEN 16

    def next(self):
        raise AssertionError("self-generated calibration must not read training data")


@pytest.mark.parametrize("shape", SHAPES)
def test_selfgen_is_deterministic_per_seed_and_rank(shape):
    cfg = tiny_config(**SHAPES[shape], gptq_calib="selfgen", gptq_calib_seqs=5, gptq_calib_seq_len=12)
    model = make_model(lambda **o: tiny_config(**SHAPES[shape], **o)).eval()
    first = train_gpt.calibration_batches(cfg, CpuRuntime(), model, Batches())
    again = train_gpt.calibration_batches(cfg, CpuRuntime(), model, Batches())
    assert [b.shape for b in first] == [(4, 12), (1, 12)]  # 5 rows in chunks of 48 // 12 = 4
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other_seed = train_gpt.calibration_batches(train_gpt.dataclasses.replace(cfg, seed=7), CpuRuntime(), model,
                                               Batches())
    other_rank = train_gpt.calibration_batches(cfg, CpuRuntime(rank=1), model, Batches())
    assert not torch.equal(first[0], other_seed[0]) and not torch.equal(first[0], other_rank[0])
    assert int(torch.cat(first).max()) < cfg.vocab_size


def test_selfgen_splits_the_sequences_over_ranks_and_logs_its_time(tiny_cfg):
    cfg = tiny_cfg(gptq_calib="selfgen", gptq_calib_seqs=9)  # GPTQ_CALIB_SEQ_LEN 0: TRAIN_SEQ_LEN
    rt = CpuRuntime(rank=3, world_size=4)
    inputs = train_gpt.calibration_batches(cfg, rt, make_model(tiny_cfg).eval(), Batches())
    assert [b.shape for b in inputs] == [(3, cfg.train_seq_len)]  # ceil(9 / 4) rows, one micro-batch chunk
    line, = rt.lines
    assert line.startswith(f"calib_selfgen seqs:12 rows_per_rank:3 seq_len:{cfg.train_seq_len} temperature:0.8 ")
    assert int(line.split("time_ms:")[1]) >= 0


def test_selfgen_text_follows_the_model():
    """The sampled continuation is the model's: a model that always predicts token 7 (via its tied head) writes 7s."""
    cfg = tiny_config(gptq_calib="selfgen", gptq_calib_seqs=2)
    model = train_gpt.GPT(cfg).eval()
    with torch.no_grad():  # projections are zero at init: the logits are rms_norm(embedding) . embedding table
        model.tok_emb.weight.zero_()
        model.tok_emb.weight[:, 0] = 1.0
        model.tok_emb.weight[7, 0] = 40.0
    ids, = train_gpt.calibration_batches(cfg, CpuRuntime(), model, Batches())
    assert (ids[:, 1:] == 7).float().mean() > 0.99


def test_pr1204_defaults_are_its_64_sequences_of_2048():
    cfg = train_gpt.Config.from_env({"PRESET": "pr1204"})
    assert (cfg.gptq_calib, cfg.gptq_calib_seqs, cfg.gptq_calib_seq_len or cfg.train_seq_len) == ("selfgen", 64, 2048)
    with pytest.raises(train_gpt.ConfigError, match="GPTQ_CALIB_SEQS must be > 0"):
        train_gpt.Config.from_env({"GPTQ_CALIB_SEQS": "0"})


def test_two_gloo_ranks_calibrate_on_their_own_text_and_export(tmp_path, demo_subset):
    """A real 2-rank run of the #1204 shape with GPTQ_CALIB=selfgen: 5 sequences split 3 + 3, the time line, export,
    roundtrip, exit 0 on both ranks."""
    from test_main import SCRIPT, run, tiny_env

    shape = {k.upper(): str(int(v) if isinstance(v, bool) else v) for k, v in TINY_1204.items()}
    env = tiny_env(demo_subset, **shape, GPTQ_CALIB="selfgen", GPTQ_CALIB_SEQS="5", GPTQ_CALIB_SEQ_LEN="24",
                   MIXER="off", ITERATIONS="6")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT]
    out = run(cmd, env, tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"^calib_selfgen seqs:6 rows_per_rank:3 seq_len:24 temperature:0\.8 time_ms:\d+$", out.stdout,
                     re.M), out.stdout[-2000:]
    assert re.search(r"^quant method:gptq calib:selfgen batches:1 time_ms:\d+", out.stdout, re.M)
    assert re.search(r"^final_roundtrip_exact val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8}$", out.stdout, re.M)
