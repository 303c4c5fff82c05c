"""records/significance.py on synthetic logs whose answers are known independently of scipy."""

from __future__ import annotations

import io
import math
import os
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "records"))
import significance  # noqa: E402


def t_sf(t: float, df: float, steps: int = 200_000) -> float:
    """P(T > t) for Student's t by Simpson integration of its density (independent of scipy)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    pdf = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    lo, hi = t, t + 2000.0
    h = (hi - lo) / steps
    total = pdf(lo) + pdf(hi) + sum((4 if i % 2 else 2) * pdf(lo + i * h) for i in range(1, steps))
    return total * h / 3


def write_log(path, seed, loss, bpb, prefix="final_mixer", mtime=None):
    path.write_text(f"model_params:1\ntrain_shards:1 val_tokens:10 seed:{seed}\n"
                    f"final_float_exact val_loss:{loss + 0.1:.8f} val_bpb:{bpb + 0.06:.8f}\n"
                    f"{prefix}_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}\n")
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def run(argv) -> tuple[int, str]:
    out = io.StringIO()
    code = significance.main(argv, out=out)
    return code, out.getvalue()


def field(text: str, key: str) -> str:
    line = [ln for ln in text.splitlines() if ln.startswith("test:")][0]
    return dict(item.split(":", 1) for item in line.split())[key]


def test_one_sample_against_a_number_matches_the_closed_form(tmp_path):
    # df = 2 has a closed-form CDF: F(t) = 1/2 + t / (2 sqrt(t^2 + 2)).
    losses = [1.00, 1.01, 0.99]
    for seed, loss in zip((1, 2, 3), losses):
        write_log(tmp_path / f"train_seed{seed}.log", seed, loss, loss / 1.7)
    code, text = run([str(tmp_path), "--baseline-nats", "1.1"])
    t = (1.0 - (1.1 - 0.005)) / (0.01 / math.sqrt(3))
    assert code == 0
    assert float(field(text, "t")) == pytest.approx(t, rel=1e-4)
    assert float(field(text, "p_value")) == pytest.approx(0.5 + t / (2 * math.sqrt(t * t + 2)), rel=1e-4)
    assert field(text, "record_rule_met") == "yes" and field(text, "test") == "one_sample"
    assert "candidate n:3 mean_val_loss:1.00000000" in text and "std_val_loss:0.01000000" in text


def test_welch_against_baseline_logs(tmp_path):
    cand, base = tmp_path / "cand", tmp_path / "base"
    cand.mkdir(), base.mkdir()
    a, b = [1.900, 1.903, 1.898], [1.912, 1.915, 1.909, 1.913]
    for i, x in enumerate(a):
        write_log(cand / f"train_seed{i}.log", i, x, x / 1.69)
    for i, x in enumerate(b):
        write_log(base / f"train_seed{i}.log", i, x, x / 1.69)
    code, text = run([str(cand), "--baseline", str(base)])
    ma, mb = sum(a) / 3, sum(b) / 4
    va = sum((x - ma) ** 2 for x in a) / 2 / 3
    vb = sum((x - mb) ** 2 for x in b) / 3 / 4
    t = (ma - (mb - 0.005)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    assert float(field(text, "t")) == pytest.approx(t, rel=1e-4)
    assert float(field(text, "df")) == pytest.approx(df, rel=1e-3)
    assert float(field(text, "p_value")) == pytest.approx(t_sf(-t, df), rel=1e-3)  # P(T < t) = P(T > -t)
    assert field(text, "test") == "welch"
    assert field(text, "record_rule_met") == ("yes" if t_sf(-t, df) < 0.01 else "no")


def test_improvement_below_the_margin_is_not_a_record(tmp_path):
    for seed, loss in zip((1, 2, 3), (1.097, 1.0972, 1.0968)):  # 0.003 nats better: precise but too small
        write_log(tmp_path / f"s{seed}.log", seed, loss, loss / 1.7)
    _, text = run([str(tmp_path), "--baseline-nats", "1.1"])
    assert float(field(text, "p_value")) > 0.5 and field(text, "record_rule_met") == "no"


def test_bpb_baseline_uses_the_candidates_nats_per_bpb(tmp_path):
    for seed, loss in zip((1, 2), (1.90, 1.91)):
        write_log(tmp_path / f"s{seed}.log", seed, loss, loss / 1.7)
    _, text = run([str(tmp_path), "--baseline-bpb", "1.2"])
    assert "baseline value_nats:2.04000000" in text


def test_newest_log_per_seed_wins_and_metric_choice(tmp_path):
    write_log(tmp_path / "old.log", 7, 2.0, 1.2, mtime=1_000_000)
    write_log(tmp_path / "new.log", 7, 1.5, 0.9, mtime=2_000_000)
    write_log(tmp_path / "other.log", 8, 1.6, 0.95, prefix="final_sliding_window")
    _, text = run([str(tmp_path), "--baseline-nats", "3"])
    assert f"superseded:{tmp_path / 'old.log'} by:{tmp_path / 'new.log'}" in text
    assert "candidate seed:7 val_loss:1.50000000" in text and "candidate n:2 " in text  # auto metric per log
    _, text = run([str(tmp_path), "--baseline-nats", "3", "--metric", "final_sliding_window"])
    assert "candidate n:1 " in text and "skipped:" in text and "p_value:nan" in text and "2 seeds" in text


def test_missing_metric_everywhere_is_an_error(tmp_path):
    (tmp_path / "x.log").write_text("nothing here\n")
    code, text = run([str(tmp_path), "--baseline-nats", "1"])
    assert code == 2 and "error:" in text
