"""Section 10, TTT=1: score-first test-time training (#456). Legality (later tokens never change earlier scores),
score-before-train order, that it learns, that the last chunk is never trained on, 2 gloo ranks, its knobs, and
the whole script running it last."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import train_gpt
from conftest import REPO, tiny_config
from test_main import SCRIPT, read_log, run, tiny_env
from test_mixer import flat_tables, random_model, stream
from train_gpt import Config, ConfigError

VOCAB = 24
# 16-token windows every 8 targets, 64-target chunks: 4 training sequences per chunk.
EVAL = dict(vocab_size=VOCAB, autocast="0", eval_seq_len=16, eval_stride=8, eval_batch_seqs=3, ttt=True,
            ttt_chunk_tokens=64, ttt_batch_seqs=4, run_id="ttt")


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Runtime writes logs/ in the working directory


def run_ttt(monkeypatch, val: torch.Tensor, **overrides) -> tuple[tuple[float, float], torch.Tensor]:
    """(loss, bpb) of TTT on a fresh seeded model, and the per-target NLL it scored, in target order."""
    cfg = tiny_config(**{**EVAL, **overrides})
    seen, real = [], train_gpt.scored_targets

    def spy(*args):
        logits, prev, y = real(*args)
        seen.append(-logits.log_softmax(-1).gather(1, y[:, None]).squeeze(1))
        return logits, prev, y

    monkeypatch.setattr(train_gpt, "scored_targets", spy)
    result = train_gpt.ttt_eval(cfg, train_gpt.Runtime(cfg, {}), random_model(tiny_config(vocab_size=VOCAB)), val,
                                flat_tables(VOCAB))
    monkeypatch.setattr(train_gpt, "scored_targets", real)
    return result, torch.cat(seen)


def test_changing_later_tokens_never_changes_earlier_scores(monkeypatch):
    val = stream(300, seed=3)
    _, nll = run_ttt(monkeypatch, val, ttt_lr=1e-2, ttt_epochs=2)
    assert len(nll) == 300
    for t in (40, 64, 65, 150, 299):  # inside chunk 0, at chunk boundaries, mid-chunk, the last token
        changed = val.clone()
        changed[t:] = (changed[t:] + 1 + torch.arange(len(val) - t) % 5) % VOCAB
        _, nll2 = run_ttt(monkeypatch, changed, ttt_lr=1e-2, ttt_epochs=2)
        # Target p is token p + 1: every target before t - 1 was scored, and trained on, before token t was seen.
        assert torch.equal(nll2[:t - 1], nll[:t - 1]), t
        assert not torch.equal(nll2[t - 1:], nll[t - 1:])


def test_first_chunk_scores_like_the_plain_sliding_window_and_later_chunks_do_not(monkeypatch):
    val = stream(300, seed=4)
    cfg = tiny_config(**EVAL)
    seen, real = [], train_gpt.scored_targets
    monkeypatch.setattr(train_gpt, "scored_targets", lambda *a: seen.append(real(*a)) or seen[-1])
    plan = train_gpt.window_plan(300, 16, 8)
    sliding, _ = train_gpt.eval_windows(train_gpt.Runtime(cfg, {}), random_model(tiny_config(vocab_size=VOCAB)), val,
                                        flat_tables(VOCAB), cfg.num_repeats, plan, cfg.eval_batch_seqs)
    monkeypatch.setattr(train_gpt, "scored_targets", real)
    plain = torch.cat([-logits.log_softmax(-1).gather(1, y[:, None]).squeeze(1) for logits, _, y in seen])
    _, adapted = run_ttt(monkeypatch, val, ttt_lr=1e-2)
    assert torch.equal(adapted[:64], plain[:64])  # chunk 0 is scored before any training
    assert (adapted[64:] != plain[64:]).float().mean() > 0.9
    unadapted, nll = run_ttt(monkeypatch, val, ttt_lr=0.0)  # LR 0: every chunk scores like the sliding window
    assert torch.equal(nll, plain) and unadapted == pytest.approx(sliding["neural"], rel=1e-6)


def test_ttt_learns_a_repeated_sequence(monkeypatch):
    # One random 64-token sequence 4x: a 16-token window never sees the previous repeat, so only the weights can.
    seq = torch.randint(0, VOCAB, (64,), generator=torch.Generator().manual_seed(0))
    val = torch.cat([seq.repeat(4), seq[:1]])
    _, before = run_ttt(monkeypatch, val, ttt_lr=0.0)
    _, after = run_ttt(monkeypatch, val, ttt_lr=1e-2, ttt_epochs=4)
    assert torch.equal(after[:64], before[:64])
    assert after[128:].mean() < before[128:].mean() - 0.5  # 3.18 -> 2.30 nats when written


def test_the_last_chunk_is_never_trained_on_and_frozen_blocks_stay(monkeypatch, tmp_path):
    steps = []

    class CountingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            steps.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", CountingAdamW)
    cfg = tiny_config(**{**EVAL, "ttt_batch_seqs": 3, "ttt_epochs": 2, "ttt_freeze_blocks": 1, "ttt_lr": 1e-2})
    model = random_model(tiny_config(vocab_size=VOCAB))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    rt = train_gpt.Runtime(cfg, {})
    train_gpt.ttt_eval(cfg, rt, model, stream(230, seed=5), flat_tables(VOCAB))
    # 230 targets = 4 chunks (the last has 38); 4 sequences per chunk in 2 steps of <= 3, 2 epochs, chunks 0-2 only.
    assert len(steps) == 3 * 2 * 2
    assert steps[::4] == pytest.approx([1e-2, 1e-2 * 0.75, 1e-2 * 0.25])  # cosine over chunk index
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    adapted = {name for name in before if not name.startswith("blocks.0.")}
    assert changed <= adapted and len(changed) > len(adapted) // 2
    log = (tmp_path / "logs" / "ttt.txt").read_text()
    count = sum(before[name].numel() for name in adapted)
    assert re.search(rf"^ttt:start chunks:4 chunk_tokens:64 lr:0.01 epochs:2 params:{count}$", log, re.M)
    assert re.search(r"^final_ttt val_loss:\S+ val_bpb:\S+ window:16 stride:8 eval_time:\d+ms$", log, re.M)
    assert re.search(r"^final_ttt_exact val_loss:\S+ val_bpb:\S+$", log, re.M)


TWO_RANK_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_config  # puts the repository on sys.path
import train_gpt
from test_mixer import flat_tables, random_model, stream
from test_ttt import EVAL, VOCAB
torch.set_num_threads(1)
cfg = tiny_config(**{{**EVAL, "ttt_chunk_tokens": int(sys.argv[1]), "ttt_batch_seqs": int(sys.argv[2]),
                      "ttt_lr": 1e-2, "ttt_epochs": 2}})
rt = train_gpt.Runtime(cfg, os.environ)
out = train_gpt.ttt_eval(cfg, rt, random_model(tiny_config(vocab_size=VOCAB)), stream(240), flat_tables(VOCAB))
open(f"result_{{sys.argv[2]}}_{{rt.rank}}.txt", "w").write(repr(out))
rt.shutdown(0)
"""


@pytest.mark.parametrize("chunk", [64, 24])  # 24: one sequence per chunk, so rank 1 only sends zero gradients
def test_two_gloo_ranks_agree_with_one_process(chunk, tmp_path):
    script = tmp_path / "two.py"
    script.write_text(TWO_RANK_SCRIPT.format(tests=str(REPO / "tests")))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    # 2 sequences per rank per step on 2 ranks, 4 in one process: the same one step per epoch over the chunk.
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(chunk), "2"], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(script), str(chunk), "4"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    rank0, rank1, single = ((tmp_path / f"result_{name}.txt").read_text() for name in ("2_0", "2_1", "4_0"))
    assert rank0 == rank1  # both ranks return the same numbers
    assert eval(rank0) == pytest.approx(eval(single), rel=1e-5)
    assert two.stdout.count("final_ttt_exact val_loss:") == 1  # rank 0 logs once


@pytest.mark.parametrize("env, message", [
    ({"TTT_CHUNK_TOKENS": "0"}, "TTT_CHUNK_TOKENS must be >= EVAL_SEQ_LEN"),
    ({"TTT_CHUNK_TOKENS": "1000"}, "TTT_CHUNK_TOKENS must be >= EVAL_SEQ_LEN=1024"),
    ({"TTT_LR": "-1"}, "TTT_LR must be a finite number >= 0"),
    ({"TTT_LR": "nan"}, "TTT_LR"),
    ({"TTT_EPOCHS": "-1"}, "TTT_EPOCHS must be >= 0"),
    ({"TTT_BATCH_SEQS": "0"}, "TTT_BATCH_SEQS must be > 0"),
    ({"TTT_FREEZE_BLOCKS": "4"}, r"TTT_FREEZE_BLOCKS must be in 0\.\.NUM_LAYERS=3"),
    ({"TTT_FREEZE_BLOCKS": "-1"}, "TTT_FREEZE_BLOCKS"),
    ({"TTT_GRAD_CLIP": "inf"}, "TTT_GRAD_CLIP"),
    ({"TTT": "1", "EVAL_STRIDE": "0"}, r"TTT=1 needs EVAL_STRIDE > 0"),
    ({"TTT": "2"}, "TTT must be 0 or 1"),
])
def test_bad_ttt_knobs_are_config_errors(env, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_env(env)


def test_ttt_knobs_defaults_and_resume():
    cfg = Config.from_env({"TTT": "1"})
    assert (cfg.ttt, cfg.ttt_chunk_tokens, cfg.ttt_lr, cfg.ttt_epochs, cfg.ttt_batch_seqs, cfg.ttt_freeze_blocks,
            cfg.ttt_grad_clip) == (True, 32768, 5e-4, 1, 16, 0, 1.0)
    assert Config(ttt_epochs=0, ttt_grad_clip=0.0).ttt_epochs == 0  # scoring only; no clipping
    other = Config(ttt=True, ttt_lr=1e-3, ttt_epochs=3, ttt_freeze_blocks=2, ttt_chunk_tokens=2048)
    assert train_gpt.resume_key(other) == train_gpt.resume_key(Config())  # TTT runs only after training


def test_the_script_runs_ttt_last_on_the_artifact(tmp_path, demo_subset):
    out = run([sys.executable, SCRIPT], tiny_env(demo_subset, TTT="1", TTT_CHUNK_TOKENS="512"), tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    _, records = read_log(tmp_path)
    assert [r["name"] for r in records][-3:] == ["final_sliding_window", "final_mixer", "final_ttt"]
    assert re.search(r"^ttt:start chunks:4 chunk_tokens:512 lr:0.0005 epochs:1 params:\d+$", out.stdout, re.M)
    assert re.search(r"^final_ttt val_loss:[\d.]+ val_bpb:[\d.]+ window:64 stride:16 eval_time:\d+ms$", out.stdout,
                     re.M)
    assert abs(records[-1]["val_bpb"] - records[-3]["val_bpb"]) < 0.05  # 3 small steps move the score little
