"""Is a candidate a record? The challenge's rule: beat the baseline by at least 0.005 nats with p < 0.01.

    python3 records/significance.py CANDIDATE... --baseline BASELINE... [--metric auto] [--alpha 0.01]
    python3 records/significance.py records/track_10min_16mb/2026-11-23_ours --baseline-bpb 1.1834

CANDIDATE and BASELINE are records folders (every *.log / *.txt inside) or log files. Each log contributes one
value per seed: the `<metric>_exact val_loss:… val_bpb:…` line (auto: the first present of mixer, sliding window,
roundtrip, float, or the challenge baseline's int8 roundtrip); when a seed appears in several logs the newest file
(modification time) wins and the older ones are listed as superseded. A number baseline is given as val_bpb
(--baseline-bpb, as on the leaderboard; converted to nats with the candidates' own nats-per-bit ratio) or as
nats (--baseline-nats).

The test is one-sided: H0 "the candidate's mean loss is not lower than the baseline's by 0.005 nats". Against
baseline logs it is Welch's t-test (unequal variances); against a number, a one-sample t-test. It lives here, not
in train_gpt.py, because train_gpt.py's bytes count against the artifact.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

METRIC_PRIORITY = ("final_ttt", "final_mixer", "final_sliding_window", "final_roundtrip", "final_float",
                   "final_int8_zlib_roundtrip")
EXACT_LINE = re.compile(r"^(\w+)_exact val_loss:(\S+) val_bpb:(\S+)", re.M)
SEED_LINE = re.compile(r"\bseed:(\d+)\b")
SEED_IN_NAME = re.compile(r"seed_?(\d+)")


@dataclass(frozen=True)
class SeedResult:
    seed: str
    val_loss: float
    val_bpb: float
    source: Path


def log_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix in (".log", ".txt") and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise SystemExit(f"error: {p} is neither a folder nor a log file")
    return files


def parse_log(path: Path, metric: str) -> SeedResult | None:
    """The run's seed and the chosen metric's exact line (the last one, if printed twice); None if absent."""
    text = path.read_text(encoding="utf-8", errors="replace")
    exact = {name: (float(loss), float(bpb)) for name, loss, bpb in EXACT_LINE.findall(text)}
    names = METRIC_PRIORITY if metric == "auto" else (metric,)
    name = next((n for n in names if n in exact), None)
    if name is None:
        return None
    seeds = SEED_LINE.findall(text) or SEED_IN_NAME.findall(path.name)
    seed = seeds[-1] if seeds else path.stem
    return SeedResult(seed, *exact[name], path)


def collect(paths: list[str], metric: str, out) -> list[SeedResult]:
    """Newest log per seed; prints what was used and what was skipped."""
    by_seed: dict[str, SeedResult] = {}
    for path in sorted(log_files(paths), key=lambda f: f.stat().st_mtime):
        result = parse_log(path, metric)
        if result is None:
            print(f"skipped:{path} reason:no_{metric}_exact_line", file=out)
            continue
        if result.seed in by_seed:
            print(f"superseded:{by_seed[result.seed].source} by:{path}", file=out)
        by_seed[result.seed] = result
    return sorted(by_seed.values(), key=lambda r: r.seed)


def summarize(label: str, results: list[SeedResult], out) -> None:
    for r in results:
        print(f"{label} seed:{r.seed} val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f} source:{r.source}", file=out)
    losses, bpbs = [r.val_loss for r in results], [r.val_bpb for r in results]
    spread = (f" std_val_loss:{statistics.stdev(losses):.8f} std_val_bpb:{statistics.stdev(bpbs):.8f}"
              if len(results) > 1 else "")
    print(f"{label} n:{len(results)} mean_val_loss:{statistics.fmean(losses):.8f} "
          f"mean_val_bpb:{statistics.fmean(bpbs):.8f}{spread}", file=out)


def one_sided_p(candidate: list[float], baseline: list[float] | float, margin: float) -> tuple[float, float, float]:
    """(t, df, p) for H1: mean(candidate) < mean(baseline) - margin. NaN when there are too few values."""
    if len(candidate) < 2 or (isinstance(baseline, list) and len(baseline) < 2):
        return math.nan, math.nan, math.nan
    from scipy import stats  # here, not at the top: make_record.py imports this module's parsers only

    if isinstance(baseline, list):
        shifted = [b - margin for b in baseline]
        res = stats.ttest_ind(candidate, shifted, equal_var=False, alternative="less")
    else:
        res = stats.ttest_1samp(candidate, baseline - margin, alternative="less")
    return float(res.statistic), float(res.df), float(res.pvalue)


def main(argv: list[str] | None = None, out=sys.stdout) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("candidate", nargs="+", help="records folder(s) or log files of the new submission")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--baseline", nargs="+", help="records folder(s) or log files of the baseline")
    group.add_argument("--baseline-bpb", type=float, help="baseline val_bpb (a number, e.g. the leaderboard's)")
    group.add_argument("--baseline-nats", type=float, help="baseline val_loss in nats")
    ap.add_argument("--metric", default="auto", help="exact-line prefix, e.g. final_sliding_window (default: auto)")
    ap.add_argument("--min-improvement-nats", type=float, default=0.005)
    ap.add_argument("--alpha", type=float, default=0.01)
    args = ap.parse_args(argv)

    candidate = collect(args.candidate, args.metric, out)
    if not candidate:
        print("error: no candidate log has the metric's exact line", file=out)
        return 2
    summarize("candidate", candidate, out)
    losses = [r.val_loss for r in candidate]
    if args.baseline:
        base_results = collect(args.baseline, args.metric, out)
        if not base_results:
            print("error: no baseline log has the metric's exact line", file=out)
            return 2
        summarize("baseline", base_results, out)
        baseline: list[float] | float = [r.val_loss for r in base_results]
        base_mean = statistics.fmean(baseline)
    else:
        nats_per_bpb = statistics.fmean(r.val_loss / r.val_bpb for r in candidate)
        baseline = args.baseline_nats if args.baseline_nats is not None else args.baseline_bpb * nats_per_bpb
        base_mean = baseline
        print(f"baseline value_nats:{baseline:.8f}", file=out)
    t, df, p = one_sided_p(losses, baseline, args.min_improvement_nats)
    delta = statistics.fmean(losses) - base_mean
    met = p < args.alpha and delta <= -args.min_improvement_nats
    test = "welch" if args.baseline else "one_sample"
    print(f"test:{test} delta_nats:{delta:.8f} required_nats:-{args.min_improvement_nats} t:{t:.4f} df:{df:.3f} "
          f"p_value:{p:.6g} alpha:{args.alpha} record_rule_met:{'yes' if met else 'no'}", file=out)
    if math.isnan(p):
        print("note: at least 2 seeds per side are needed for a p-value", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
