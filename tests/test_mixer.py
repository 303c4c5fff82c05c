"""Sections 9-10 (final evals): the window plan, the online mixers against a naive per-token implementation, the
mixture's mass, score-first legality, zero-count ranks, determinism, and 2 gloo ranks agreeing."""

from __future__ import annotations

import collections
import contextlib
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt
from conftest import REPO, tiny_config
from train_gpt import Mixer, window_plan

VOCAB = 24


# --- window plan ---


@pytest.mark.parametrize("window", [1, 2, 5, 16, 64])
def test_window_plan_scores_every_target_once_with_the_longest_context(window):
    for total in [1, 2, 3, 7, 16, 63, 64, 65, 100, 257]:
        for stride in sorted({1, 2, 3, max(1, window // 4), max(1, window // 2), window - 1, window} - {0}):
            plan = window_plan(total, window, stride)
            starts, lengths, scored_from = plan.unbind(1)
            length = min(window, total)
            assert (lengths == length).all() and (starts >= 0).all() and (starts + length <= total).all()
            scored = torch.cat([torch.arange(s + f, s + length) for s, f in zip(starts.tolist(), scored_from.tolist())])
            assert scored.tolist() == list(range(total)), (total, window, stride)  # each once, in order
            # Context of target p in its window = p - start + 1 tokens: all there is, or >= window - stride + 1.
            context = torch.cat([torch.arange(f, length) + 1 for f in scored_from.tolist()])
            targets = torch.arange(total)
            assert ((context == targets + 1) | (context >= min(length, window - stride + 1))).all()
            assert (context[:length] == targets[:length] + 1).all()  # the first window scores all it has


def test_window_plan_with_stride_equal_to_window_is_non_overlapping_blocks():
    plan = window_plan(64, 16, 16)
    assert plan.tolist() == [[0, 16, 0], [16, 16, 0], [32, 16, 0], [48, 16, 0]]
    # The reference's tail re-scored targets; here the last window ends at the total and scores only new ones.
    assert window_plan(70, 16, 16)[-1].tolist() == [54, 16, 10]


def test_prior_occurrences_counts_earlier_equal_keys():
    keys = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(0))
    expected = [keys[:i].eq(k).sum().item() for i, k in enumerate(keys.tolist())]
    assert train_gpt.prior_occurrences(keys).tolist() == expected


# --- the mixers against a naive implementation written from the spec ---


def stream(n: int, seed: int = 0) -> torch.Tensor:
    """Tokens with repeats (a random walk over a few phrases) so the n-gram experts have something to learn."""
    gen = torch.Generator().manual_seed(seed)
    phrases = [torch.randint(0, VOCAB, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen)
               for _ in range(12)]
    parts = [phrases[int(i)] if torch.rand(1, generator=gen) < 0.7 else torch.randint(0, VOCAB, (4,), generator=gen)
             for i in torch.randint(0, 12, (n,), generator=gen)]
    return torch.cat(parts)[:n + 1]


def neural_rows(n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, VOCAB, generator=gen, dtype=torch.float64) * 2).log_softmax(-1)


def naive_mixture(tokens: list[int], logp: torch.Tensor, batches: list[tuple[int, int]], reference: bool, eta: float,
                  cold: int) -> list[float]:
    """Mixed NLL per target, one token at a time, with dict counts (section 9's mixers as plain Python)."""
    pairs, totals = [collections.Counter() for _ in range(3)], [collections.Counter() for _ in range(3)]
    lam = [[2.0, 0.0, 0.0, 0.0, 0.0] for _ in range(1 if reference else 42)]
    out = []
    for a, b in batches:
        seen, grads, n_tokens = [], collections.defaultdict(lambda: [0.0] * 6), totals[0][0]
        for p in range(a, b):
            y, x1, x2 = tokens[p + 1], tokens[p], tokens[p - 1] if p else 0
            ctx = [0, x1, ((x2 * 36313) ^ (x1 * 27191)) % 65536]
            c = [(pairs[o][ctx[o], y], totals[o][ctx[o]]) for o in range(3)]
            entropy = -(logp[p].exp() * logp[p]).sum().item()
            uni = (c[0][0] + 0.1) / (c[0][1] + 0.1 * VOCAB)
            bi = (c[1][0] + 0.1) / (c[1][1] + 0.1 * VOCAB)
            if reference:
                tri = (c[2][0] + 0.01) / (max(c[2][1], 1) + 0.01 * VOCAB)
                fifth = math.exp(-entropy)
            else:
                tri = (c[2][0] + 0.01) / (c[2][1] + 0.01 * VOCAB)
                back_bi = (c[1][0] + 4 * uni) / (c[1][1] + 4)
                fifth = (c[2][0] + 4 * back_bi) / (c[2][1] + 4)
            probs = [math.exp(logp[p, y].item()), uni, bi, tri, fifth]
            bucket = 0 if reference else min(max(int(entropy), 0), 5) * 7 + min(int(math.log2(c[2][1] + 1)), 6)
            z = sum(math.exp(v) for v in lam[bucket])
            weights = [math.exp(v) / z for v in lam[bucket]]
            if reference and n_tokens < cold:
                weights = [1.0, 0.0, 0.0, 0.0, 0.0]
            mixed = sum(w * q for w, q in zip(weights, probs))
            out.append(-math.log(mixed))
            grad = grads[bucket]
            for k in range(5):
                grad[k] += math.log(probs[k]) if reference else probs[k] / mixed
            grad[5] += 1
            seen.append((ctx, y))
            if not reference:
                for o in range(3):
                    pairs[o][ctx[o], y] += 1
                    totals[o][ctx[o]] += 1
        if reference:
            for ctx, y in seen:
                for o in range(3):
                    pairs[o][ctx[o], y] += 1
                    totals[o][ctx[o]] += 1
        for bucket, grad in grads.items():
            if not (reference and n_tokens < cold):
                step = eta / grad[5] if reference else eta / (grad[5] + 16)  # batch mean / shrunk batch mean
                lam[bucket] = [v + step * g for v, g in zip(lam[bucket], grad)]
    return out


def run_mixer(mixer: Mixer, logp: torch.Tensor, batches: list[tuple[int, int]]) -> torch.Tensor:
    out = []
    for a, b in batches:
        rows = logp[a:b]
        targets = mixer.tokens[a + 2:b + 2].long()  # target p is token p + 1; tokens carry one leading pad
        out.append(mixer.score(a, -rows.gather(1, targets[:, None])[:, 0], -(rows.exp() * rows).sum(-1)))
        for j in (0, (b - a) // 2, b - a - 1):
            mixer.check(j, rows[j])
        mixer.update()
    return torch.cat(out)


def batches_of(total: int, sizes: list[int]) -> list[tuple[int, int]]:
    out, a, i = [], 0, 0
    while a < total:
        b = min(total, a + sizes[i % len(sizes)])
        out.append((a, b))
        a, i = b, i + 1
    return out


@pytest.mark.parametrize("mode", ["normalized", "reference_hedge"])
def test_mixer_matches_the_naive_per_token_implementation(mode, monkeypatch):
    monkeypatch.setattr(train_gpt, "HEDGE_COLD_START", 300)  # the reference mixes after 300 tokens, not 10,000
    n = 1500
    tokens, logp = stream(n), neural_rows(n)
    batches = batches_of(n, [1, 7, 64, 200, 33])
    cfg = tiny_config(vocab_size=VOCAB, mixer=mode)
    mixer = Mixer(cfg, tokens, torch.device("cpu"))
    got = run_mixer(mixer, logp, batches)
    want = naive_mixture(tokens.tolist(), logp, batches, mode == "reference_hedge", mixer.eta, 300)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    assert mixer.errors[2] < 1e-12  # brute-force p(target) equals the scored one
    assert int(mixer.totals[0][0]) == n and int(mixer.pairs[2].sum()) == n  # every scored target counted once
    if mode == "normalized":
        assert mixer.errors[0] < 1e-12 and 0.99 < mixer.errors[1] < 1 + 1e-12  # mass 1 at every checked position
        assert got.mean() < -logp.gather(1, tokens[1:, None]).mean() - 0.3  # and it learns the phrases
    else:
        assert mixer.errors[1] > 1.5  # e^-H on every token: far more than mass 1


# --- the eval pipeline: legality, zero-count ranks, determinism ---


def random_model(cfg, seed: int = 0) -> train_gpt.GPT:
    torch.manual_seed(seed)
    model = train_gpt.GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.2)
    return model.eval()


def flat_tables(vocab: int) -> train_gpt.ByteTables:
    return train_gpt.ByteTables(torch.ones(vocab, dtype=torch.int32), torch.zeros(vocab, dtype=torch.bool),
                                torch.zeros(vocab, dtype=torch.bool))


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Runtime writes logs/ in the working directory
    return lambda cfg: train_gpt.Runtime(cfg, {})


def scored_stream(monkeypatch, cfg, rt, model, val) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target (neural NLL, mixed NLL) of one sliding + mixer pass, in target order."""
    seen = []
    real = train_gpt.mix_batch

    def spy(rt, mixer, batch, rows, log_probs, nll):
        mixed = real(rt, mixer, batch, rows, log_probs, nll)
        seen.append(torch.stack([nll.double(), mixed]))
        return mixed

    monkeypatch.setattr(train_gpt, "mix_batch", spy)
    plan = window_plan(len(val) - 1, cfg.eval_seq_len, cfg.eval_stride)
    train_gpt.eval_windows(rt, model, val, flat_tables(cfg.vocab_size), cfg.num_repeats, plan, cfg.eval_batch_seqs,
                           Mixer(cfg, val, rt.device))
    monkeypatch.setattr(train_gpt, "mix_batch", real)
    return torch.cat(seen, 1).unbind(0)


@pytest.mark.parametrize("mode", ["normalized", "reference_hedge"])
def test_changing_later_tokens_never_changes_earlier_scores(mode, monkeypatch, runtime):
    monkeypatch.setattr(train_gpt, "HEDGE_COLD_START", 100)
    cfg = tiny_config(vocab_size=VOCAB, autocast="0", mixer=mode, eval_seq_len=32, eval_stride=8, eval_batch_seqs=3)
    rt, model, val = runtime(cfg), random_model(tiny_config(vocab_size=VOCAB)), stream(400, seed=3)
    neural, mixed = scored_stream(monkeypatch, cfg, rt, model, val)
    for t in (57, 250, 399):  # token t and everything after it changes (mid-batch, mid-window, the end)
        changed = val.clone()
        changed[t:] = (changed[t:] + 1 + torch.arange(len(val) - t) % 5) % VOCAB
        neural2, mixed2 = scored_stream(monkeypatch, cfg, rt, model, changed)
        # Target p is token p + 1: targets before t - 1 must score bit-identically (sliding and mixer).
        assert torch.equal(neural2[:t - 1], neural[:t - 1]) and torch.equal(mixed2[:t - 1], mixed[:t - 1]), t
        assert not torch.equal(mixed2[t - 1:], mixed[t - 1:])  # the later scores did see the change


class FakeRank:
    """Rank `rank` of `world` for a pass without a mixer (no collective runs): records its local sums."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world_size, self.device, self.reduced = rank, world, torch.device("cpu"), []

    def autocast(self):
        return contextlib.nullcontext()

    def all_reduce(self, tensor, op="sum"):
        self.reduced.append(tensor.clone())
        return tensor


def test_a_rank_that_scores_nothing_returns_nan_without_raising():
    cfg = tiny_config(vocab_size=VOCAB, autocast="0")
    model, val = random_model(cfg), stream(40)
    plan = window_plan(len(val) - 1, 16, 8)  # 4 windows: with 2 per rank, ranks 2 and 3 of 4 get none
    for rank in (2, 3):
        fake = FakeRank(rank, 4)
        results, _ = train_gpt.eval_windows(fake, model, val, flat_tables(VOCAB), 4, plan, 2)
        assert fake.reduced[0].tolist() == [0.0, 0.0, 0.0] and all(math.isnan(v) for v in results["neural"])


def test_final_evals_are_deterministic_and_logged(runtime, tmp_path):
    cfg = tiny_config(vocab_size=VOCAB, autocast="1", eval_seq_len=32, eval_stride=8, eval_batch_seqs=4)
    model, val = random_model(tiny_config(vocab_size=VOCAB)), stream(600, seed=5)
    rt = runtime(cfg)
    first = train_gpt.run_final_evals(cfg, rt, model, val, flat_tables(VOCAB))
    again = train_gpt.run_final_evals(cfg, rt, model, val, flat_tables(VOCAB))
    assert first == again and set(first) == {"final_sliding_window", "final_mixer"}
    assert first["final_mixer"][1] < first["final_sliding_window"][1]
    log = (tmp_path / "logs" / f"{rt.cfg.run_id}.txt").read_text()
    assert len(re.findall(r"^final_sliding_window val_loss:\S+ val_bpb:\S+ window:32 stride:8 eval_time:\d+ms$",
                          log, re.M)) == 2
    errs = [float(e) for e in re.findall(r"^mixer_mass_max_abs_err:(\S+) ", log, re.M)]
    assert len(errs) == 2 and max(errs) <= 1e-5
    assert train_gpt.run_final_evals(train_gpt.dataclasses.replace(cfg, mixer="off"), rt, model, val,
                                     flat_tables(VOCAB)) == {"final_sliding_window": first["final_sliding_window"]}
    assert train_gpt.run_final_evals(train_gpt.dataclasses.replace(cfg, eval_stride=0), rt, model, val,
                                     flat_tables(VOCAB)) == {}


def test_a_new_expert_is_one_table_entry(runtime, tmp_path, monkeypatch):
    """A sixth expert (uniform over the vocabulary) is one EXPERTS entry: the weights, the logged mean weights
    and the brute-force mass check all follow it."""
    def uniform(evidence):
        return torch.full_like(evidence.neural_log_probs, -math.log(evidence.vocab))

    monkeypatch.setitem(train_gpt.EXPERTS, "normalized", {**train_gpt.EXPERTS["normalized"], "uniform": uniform})
    cfg = tiny_config(vocab_size=VOCAB, autocast="0", eval_seq_len=32, eval_stride=8, eval_batch_seqs=4)
    rt = runtime(cfg)
    train_gpt.run_final_evals(cfg, rt, random_model(tiny_config(vocab_size=VOCAB)), stream(600, seed=5),
                              flat_tables(VOCAB))
    log = (tmp_path / "logs" / f"{rt.cfg.run_id}.txt").read_text()
    line = re.search(r"^mixer_mass_max_abs_err:(\S+) .* mean_weights (.*)$", log, re.M)
    assert float(line.group(1)) <= 1e-5
    names = [weight.split(":")[0] for weight in line.group(2).split()]
    assert names == ["neural", "unigram", "bigram", "trigram", "interpolated", "uniform"]


# --- two gloo ranks ---

TWO_RANK_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_config  # puts the repository on sys.path
import train_gpt
from test_mixer import VOCAB, flat_tables, random_model, stream
train_gpt.HEDGE_COLD_START = 100
torch.set_num_threads(1)
cfg = tiny_config(vocab_size=VOCAB, autocast="0", eval_seq_len=32, eval_stride=8, eval_batch_seqs=7,
                  mixer_update_targets=int(sys.argv[1]), mixer=sys.argv[2], run_id="two")
rt = train_gpt.Runtime(cfg, os.environ)
out = train_gpt.run_final_evals(cfg, rt, random_model(tiny_config(vocab_size=VOCAB)), stream(500), flat_tables(VOCAB))
open(f"result_{{rt.world_size}}_{{rt.rank}}.txt", "w").write(repr(sorted(out.items())))
rt.shutdown(0)
"""


@pytest.mark.parametrize("mode", ["normalized", "reference_hedge"])
def test_one_two_and_three_gloo_ranks_give_one_score(mode, tmp_path):
    """The mixer learns every MIXER_UPDATE_TARGETS targets whatever the world size: 100 is no multiple of a batch's
    56 (1 rank), 112 (2) or 168 (3) targets, so chunks straddle eval batches and are scored again whole."""
    script = tmp_path / "two.py"
    script.write_text(TWO_RANK_SCRIPT.format(tests=str(REPO / "tests")))
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    # 500 targets / stride 8 = 60 windows; 7 per rank leaves rank 1 without a window in the last global batch of 2.
    runs = {}
    for world in (2, 3):
        runs[world] = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                      f"--nproc_per_node={world}", str(script), "100", mode], env=env, cwd=tmp_path,
                                     capture_output=True, text=True, timeout=240)
        assert runs[world].returncode == 0, runs[world].stderr[-3000:]
    one = subprocess.run([sys.executable, str(script), "100", mode], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    results = {name: (tmp_path / f"result_{name}.txt").read_text() for name in ("1_0", "2_0", "2_1", "3_0", "3_2")}
    assert results["2_0"] == results["2_1"] and results["3_0"] == results["3_2"]  # every rank returns the same
    single = eval(results["1_0"])
    assert [name for name, _ in single] == ["final_mixer" if mode == "normalized" else "final_hedge_reference",
                                            "final_sliding_window"]
    for world in ("2_0", "3_0"):
        for (_, got), (_, want) in zip(eval(results[world]), single):
            assert got == pytest.approx(want, rel=1e-12, abs=0)  # the same chunks, so the same mixer updates
    two = runs[2]
    assert two.stdout.count("_exact val_loss:") == 2  # rank 0 logs each eval once
    warning = r"^warning: reference hedge mixture is not a normalized distribution \(mass_max:\S+\)$"
    assert (re.search(warning, two.stdout, re.M) is not None) == (mode == "reference_hedge")
    mass_err = float(re.search(r"^mixer_mass_max_abs_err:(\S+) ", two.stdout, re.M).group(1))
    assert mass_err <= 1e-5 if mode == "normalized" else mass_err > 1e-2


@pytest.mark.parametrize("mode", ["normalized", "reference_hedge"])
def test_mix_scores_do_not_depend_on_how_the_stream_is_batched(mode, monkeypatch):
    """Mixer.mix learns at fixed target counts, so feeding the stream in batches of any size gives the same bits."""
    monkeypatch.setattr(train_gpt, "HEDGE_COLD_START", 100)
    n = 700
    tokens, logp = stream(n), neural_rows(n)
    nll = -logp.gather(1, tokens[1:, None])[:, 0]
    features = torch.stack([nll, -(logp.exp() * logp).sum(-1)], 1).float()
    cfg = tiny_config(vocab_size=VOCAB, mixer=mode, eval_seq_len=32, eval_stride=8, mixer_update_targets=50)
    outs = []
    for sizes in ([1000], [56], [112, 168], [1, 7, 64, 200, 33]):
        mixer, out = Mixer(cfg, tokens, torch.device("cpu")), []
        for a, b in batches_of(n, sizes):
            out.append(mixer.mix(a, features[a:b], 0, logp[a:a + 1].float()))  # checks target a
        outs.append(torch.cat(out))
        assert int(mixer.totals[0][0]) == 24 + 50 * 13  # learned from every finished chunk: 24, then 50 each
        assert mixer.errors[2] < 1e-12  # the spot checks rebuild the scored probability
    assert all(torch.equal(out, outs[0]) for out in outs[1:])


def eval_only_exact_lines(tmp_path: Path, demo_subset: dict, world: int) -> list[str]:
    from test_inputs import tiny_artifact
    from test_main import tiny_env

    artifact = tmp_path / "one.ptz"
    if not artifact.exists():
        tiny_artifact(artifact, demo_subset["vocab_size"])
    env = tiny_env(demo_subset, EVAL_ONLY=str(artifact), RUN_ID=f"w{world}")
    for knob in ("VOCAB_SIZE", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "MLP_MULT"):
        env.pop(knob)  # the shape comes from the artifact
    cmd = [sys.executable, str(REPO / "train_gpt.py")]
    if world > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return re.findall(r"^final_\w+_exact .*$", out.stdout, re.M)


def test_eval_only_of_one_artifact_prints_the_same_scores_on_1_2_and_3_ranks(tmp_path, demo_subset):
    """The user checking an N-rank submission on one machine gets the submitted digits (MIXER_UPDATE_TARGETS)."""
    single = eval_only_exact_lines(tmp_path, demo_subset, 1)
    assert [line.split()[0] for line in single] == ["final_roundtrip_exact", "final_sliding_window_exact",
                                                    "final_mixer_exact"]
    for world in (2, 3):
        assert eval_only_exact_lines(tmp_path, demo_subset, world) == single, world


def test_eval_only_on_8_ranks_prints_the_one_rank_scores_SLOW(tmp_path, demo_subset):
    assert eval_only_exact_lines(tmp_path, demo_subset, 8) == eval_only_exact_lines(tmp_path, demo_subset, 1)
