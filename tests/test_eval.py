"""Sections 9-10 (pure parts): non-overlapping validation, SWA averaging, the training clock."""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import pytest
import sentencepiece
import torch

import build_dataset
import train_gpt
from train_gpt import GPT, TrainClock, TrainState, eval_blocks, swa_apply, swa_collect

VAL_CAP = 800  # 50 blocks of 16 tokens: small, and not a multiple of the batch row counts used below


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    """A real single-process CPU Runtime (it creates logs/ in the working directory, so work in tmp_path)."""
    monkeypatch.chdir(tmp_path)

    def make(cfg):
        rt = train_gpt.Runtime(cfg, {})
        assert not rt.distributed and rt.world_size == 1 and rt.rank == 0 and rt.device.type == "cpu"
        return rt

    return make


@pytest.fixture(scope="module")
def sp(demo_subset):
    return sentencepiece.SentencePieceProcessor(model_file=demo_subset["tokenizer_path"])


@pytest.fixture
def eval_cfg(tiny_cfg, demo_subset):
    def make(**kw):
        base = dict(data_path=demo_subset["data_path"], vocab_size=demo_subset["vocab_size"], autocast="0",
                    val_max_tokens=VAL_CAP)
        base.update(kw)
        return tiny_cfg(**base)

    return make


def random_model(cfg, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.2)
    return model.eval()


def hand_bytes(sp, prev: list[int], target: list[int]) -> int:
    """The challenge's byte rule written directly against the SentencePiece API (no tables)."""
    def special(i):
        return sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)

    total = 0
    for p, t in zip(prev, target):
        if special(t):
            continue
        if sp.is_byte(t):
            total += 1
            continue
        piece = sp.id_to_piece(t)
        if piece.startswith("\u2581"):
            total += len(piece[1:].encode("utf-8")) + (0 if special(p) else 1)
        else:
            total += len(piece.encode("utf-8"))
    return total


class RecordingRanks:
    """A Runtime-like object for rank `rank` of `world`; its all_reduce records the local sums (no collective)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world_size, self.device = rank, world, torch.device("cpu")
        self.reduced: list[torch.Tensor] = []

    def autocast(self):
        return contextlib.nullcontext()

    def all_reduce(self, tensor, op="sum"):
        self.reduced.append(tensor.clone())
        return tensor


# --- eval_blocks ---


def test_eval_rows():
    cfg = train_gpt.Config()
    assert train_gpt.eval_rows(cfg) == 64  # the reference's 64 sequences per rank on 8 GPUs (and 1 GPU's per step)
    assert train_gpt.eval_rows(train_gpt.Config(val_batch_size=1000)) == 1  # never zero rows
    assert train_gpt.eval_rows(train_gpt.Config(grad_accum_steps=1, val_batch_size=8192)) == 8  # any world size


@pytest.mark.parametrize("repeats", [2, 4])
def test_eval_equals_hand_computation(eval_cfg, runtime, sp, repeats):
    cfg = eval_cfg()
    rt = runtime(cfg)
    model = random_model(cfg)
    val = train_gpt.load_val_tokens(cfg)
    assert len(val) == VAL_CAP + 1
    tables = train_gpt.build_byte_tables(sp, cfg.vocab_size)
    loss, bpb = eval_blocks(cfg, rt, model, val, tables, repeats)
    seq = cfg.train_seq_len
    x, y = val[:-1].view(-1, seq), val[1:].view(-1, seq)
    with torch.no_grad():
        nll = model(x, repeats, y).double().sum().item()
    nbytes = hand_bytes(sp, val[:-1].tolist(), val[1:].tolist())
    assert loss == pytest.approx(nll / VAL_CAP, rel=1e-6)
    assert bpb == pytest.approx(nll / (math.log(2) * nbytes), rel=1e-6)
    assert 1.0 < nbytes / VAL_CAP < 6.0  # sanity: a few bytes per token


def test_padding_the_last_batch_does_not_change_results(eval_cfg, runtime, sp):
    results = []
    for val_batch_size in (48, 112, 4096):  # 3, 7, 256 rows per batch for 50 blocks: last batch padded
        cfg = eval_cfg(val_batch_size=val_batch_size)
        rt = runtime(cfg)
        model = random_model(cfg)
        val = train_gpt.load_val_tokens(cfg)
        tables = train_gpt.build_byte_tables(sp, cfg.vocab_size)
        results.append(eval_blocks(cfg, rt, model, val, tables, 4))
    for loss, bpb in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-6)
        assert bpb == pytest.approx(results[0][1], rel=1e-6)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_each_global_batch_of_blocks(eval_cfg, sp, world):
    cfg = eval_cfg(val_batch_size=480)  # 30, 3 or 2 rows per rank for 1, 2, 3 ranks (grad accum 8 // world)
    model = random_model(cfg)
    val = train_gpt.load_val_tokens(cfg)
    tables = train_gpt.build_byte_tables(sp, cfg.vocab_size)
    single = RecordingRanks(0, 1)
    eval_blocks(cfg, single, model, val, tables, 4)
    (whole,) = single.reduced
    parts = []
    for rank in range(world):
        fake = RecordingRanks(rank, world)
        eval_blocks(cfg, fake, model, val, tables, 4)
        parts.append(fake.reduced[0])
    summed = torch.stack(parts).sum(0)
    assert summed[1].item() == whole[1].item() == VAL_CAP  # every target scored exactly once
    assert summed[2].item() == whole[2].item()
    assert summed[0].item() == pytest.approx(whole[0].item(), rel=1e-6)  # fp32 per-batch sums
    # Each global batch of rows * world consecutive blocks gives rank r its r-th run of `rows` blocks.
    rows, n = train_gpt.eval_rows(cfg), VAL_CAP // 16
    blocks = [sum(len(range(b + r * rows, min(b + (r + 1) * rows, n))) for b in range(0, n, rows * world))
              for r in range(world)]
    assert [p[1].item() for p in parts] == [16 * k for k in blocks]


def test_eval_under_autocast_is_close(eval_cfg, runtime, sp):
    cfg32, cfg16 = eval_cfg(), eval_cfg(autocast="1")
    model = random_model(cfg32)
    val = train_gpt.load_val_tokens(cfg32)
    tables = train_gpt.build_byte_tables(sp, cfg32.vocab_size)
    loss32, bpb32 = eval_blocks(cfg32, runtime(cfg32), model, val, tables, 4)
    loss16, bpb16 = eval_blocks(cfg16, runtime(cfg16), model, val, tables, 4)
    assert loss16 != loss32
    assert loss16 == pytest.approx(loss32, rel=1e-3) and bpb16 == pytest.approx(bpb32, rel=1e-3)


def test_runtime_single_process(tmp_path, monkeypatch, tiny_cfg):
    monkeypatch.chdir(tmp_path)
    rt = train_gpt.Runtime(tiny_cfg(run_id="unit"), {})
    assert rt.cfg.run_id == "unit" and rt.log_path.as_posix() == "logs/unit.txt"
    rt.log("hello", console=False)
    assert (tmp_path / "logs" / "unit.txt").read_text() == "hello\n"
    assert not rt.use_compile  # COMPILE=0
    t = torch.tensor([3.0])
    assert rt.all_reduce(t) is t and t.item() == 3.0
    assert rt.all_max(2.5, 1.0) == [2.5, 1.0]
    generated = train_gpt.Runtime(tiny_cfg(), {}).cfg.run_id
    assert generated  # one is drawn when RUN_ID is empty


# --- SWA ---


def set_params(model, value_fn):
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(value_fn(i, p))


def test_swa_collect_and_apply_average_exactly(tiny_cfg):
    torch.manual_seed(0)
    model = GPT(tiny_cfg())
    snapshots = []
    state = TrainState()
    gen = torch.Generator().manual_seed(0)
    for k in range(3):
        set_params(model, lambda i, p: torch.randn(p.shape, generator=gen))
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
        swa_collect(state, model)
        assert state.swa_count == k + 1
    # The collected sums are copies, not views of the live parameters.
    set_params(model, lambda i, p: torch.randn(p.shape, generator=gen))
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    count = swa_apply(state, model)
    assert count == 4 == state.swa_count  # 3 collected + the final weights
    for n, p in model.named_parameters():
        expected = (snapshots[0][n] + snapshots[1][n] + snapshots[2][n] + final[n]) / 4
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)


def test_swa_apply_without_collection_is_a_no_op(tiny_cfg):
    torch.manual_seed(0)
    model = GPT(tiny_cfg())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = TrainState()
    assert swa_apply(state, model) == 0
    assert state.swa_sum is None
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])


def test_swa_accumulates_in_fp32_and_restores_dtype(tiny_cfg):
    torch.manual_seed(0)
    model = GPT(tiny_cfg()).to(torch.bfloat16)
    state = TrainState()
    set_params(model, lambda i, p: torch.full(p.shape, 1.0))
    swa_collect(state, model)
    assert all(t.dtype == torch.float32 for t in state.swa_sum.values())
    set_params(model, lambda i, p: torch.full(p.shape, 1.0 + 2 ** -7))  # representable in bf16
    assert swa_apply(state, model) == 2
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p.detach(), torch.full(p.shape, 1.0 + 2 ** -8, dtype=torch.bfloat16))


# --- TrainClock ---


def test_train_clock_pause_and_resume(tiny_cfg, runtime):
    clock = TrainClock(runtime(tiny_cfg()))
    assert clock.elapsed_ms() == 0.0  # not started
    clock.start()
    t1 = clock.elapsed_ms()
    time.sleep(0.01)
    t2 = clock.elapsed_ms()
    assert 0.0 <= t1 < t2
    clock.pause()
    paused = clock.elapsed_ms()
    assert paused >= t2
    time.sleep(0.02)
    assert clock.elapsed_ms() == paused  # paused time is not counted
    clock.start()
    t3 = clock.elapsed_ms()
    time.sleep(0.01)
    t4 = clock.elapsed_ms()
    assert paused <= t3 < t4  # resumes from the banked time
    clock.pause()
    assert clock.elapsed_ms() >= t4
    assert clock.banked_ms == clock.elapsed_ms()


def test_train_clock_excludes_paused_intervals(tiny_cfg, runtime):
    clock = TrainClock(runtime(tiny_cfg()))
    wall0 = time.perf_counter()
    clock.start()
    time.sleep(0.01)
    clock.pause()
    time.sleep(0.04)  # excluded
    clock.start()
    time.sleep(0.01)
    clock.pause()
    wall_ms = 1000 * (time.perf_counter() - wall0)
    assert clock.elapsed_ms() < wall_ms  # the paused 40 ms are not in the training time


# --- SWA inside the training loop ---


def make_trainer(cfg, rt, tmp_path):
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    build_dataset.write_shard(shard_dir / "fineweb_train_000000.bin", np.arange(4000) % cfg.vocab_size)
    torch.manual_seed(0)
    model = GPT(cfg)
    local = train_gpt.local_batch_tokens(cfg, 1)
    batches = train_gpt.TrainBatches(train_gpt.TokenStream(train_gpt.shard_paths(str(shard_dir), "train")), 0, 1,
                                     local, cfg.train_seq_len, rt.device)
    trainer = train_gpt.Trainer(cfg, rt, model, model, train_gpt.build_optimizers(model, cfg, fused=False), batches,
                                torch.zeros(cfg.train_seq_len + 1, dtype=torch.int64), None)
    state = TrainState(repeats=train_gpt.repeats_at(cfg, 0.0))
    trainer.clock.start()
    return trainer, state


def test_swa_collects_in_the_warmdown(tiny_cfg, runtime, tmp_path):
    # Positive control for the test below: at full depth, no warmup, step-mode warmdown over the 4 steps
    # (scales 1, 0.75, 0.5, 0.25), SWA_EVERY 2 collects after step 4 only (scale 0.25 < 0.6).
    cfg = tiny_cfg(prog_depth="1.0:4", lr_warmup_steps=0, swa_every=2, iterations=4, warmdown_iters=4,
                   grad_accum_steps=1, autocast="0")
    trainer, state = make_trainer(cfg, runtime(cfg), tmp_path)
    for _ in range(4):
        trainer.advance(state, 1)
    assert state.step == 4 and state.repeats == 4
    assert state.swa_count == 1


def test_swa_does_not_collect_during_lr_warmup(tiny_cfg, runtime, tmp_path):
    # SWA_START_FRAC is a warmdown threshold ("collect once the LR has decayed below 0.6 of its peak"). The
    # explicit LR warmup (absent in the reference) also makes the scale small at the start, so at full depth
    # from step 0 (PROG_DEPTH=1.0:4) the warmup's near-initial weights must not enter the average.
    cfg = tiny_cfg(prog_depth="1.0:4", lr_warmup_steps=10, swa_every=2, iterations=100, warmdown_iters=4,
                   grad_accum_steps=1, autocast="0")
    trainer, state = make_trainer(cfg, runtime(cfg), tmp_path)
    for _ in range(4):  # LR scales 0.1, 0.2, 0.3, 0.4: warming up, far from the warmdown
        trainer.advance(state, 1)
    assert state.step == 4 and state.repeats == 4
    assert state.swa_count == 0 and state.swa_sum is None


# --- EMA ---


def test_ema_is_off_by_default(tiny_cfg, runtime, tmp_path):
    cfg = tiny_cfg(prog_depth="1.0:4", grad_accum_steps=1, autocast="0")
    trainer, state = make_trainer(cfg, runtime(cfg), tmp_path)
    trainer.advance(state, 1)
    assert state.ema is None
    assert train_gpt.apply_weight_average(cfg, state, trainer.model) == "swa:apply checkpoints:0"


def test_ema_follows_every_step_and_is_applied_in_each_params_dtype(tiny_cfg, runtime, tmp_path):
    cfg = tiny_cfg(prog_depth="1.0:4", swa_enabled=False, ema_decay=0.75, grad_accum_steps=1, autocast="0")
    trainer, state = make_trainer(cfg, runtime(cfg), tmp_path)
    want = None
    for step in (1, 2, 3):  # by hand, in float64: the first step's weights, then ema = d ema + (1 - d) w
        trainer.advance(state, 1)
        w = {n: p.detach().double().clone() for n, p in trainer.model.named_parameters()}
        d = min(0.75, (1 + step) / (10 + step))  # the warmup: 3/12, then 4/13
        want = w if want is None else {n: d * want[n] + (1 - d) * w[n] for n in w}
    assert set(state.ema) == set(want) and all(t.dtype == torch.float32 for t in state.ema.values())
    for n, t in state.ema.items():
        torch.testing.assert_close(t, want[n].float(), rtol=1e-6, atol=1e-7)
    assert not torch.equal(state.ema["blocks.0.mlp.fc.weight"], trainer.model.blocks[0].mlp.fc.weight)
    with torch.no_grad():
        trainer.model.loop_embed.data = trainer.model.loop_embed.data.bfloat16()
    assert train_gpt.apply_weight_average(cfg, state, trainer.model) == "ema:apply decay:0.75"
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), state.ema[n].to(p.dtype))
    assert trainer.model.loop_embed.dtype == torch.bfloat16 and state.swa_sum is None


def test_ema_checkpoint_resume_is_bit_identical(tiny_cfg, runtime, tmp_path):
    cfg = tiny_cfg(prog_depth="1.0:4", swa_enabled=False, ema_decay=0.9, grad_accum_steps=1, autocast="0")
    trainer, state = make_trainer(cfg, runtime(cfg), tmp_path)
    for _ in range(2):
        trainer.advance(state, 1)
    trainer.save_checkpoint(state)
    trainer.advance(state, 1)
    resumed = trainer.load_checkpoint(trainer.checkpoint_path())
    assert resumed.step == 2 and not torch.equal(resumed.ema["tok_emb.weight"], state.ema["tok_emb.weight"])
    trainer.advance(resumed, 1)
    assert resumed.ema.keys() == state.ema.keys()
    assert all(torch.equal(resumed.ema[n], state.ema[n]) for n in state.ema)
