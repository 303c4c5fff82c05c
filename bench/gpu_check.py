"""The Python half of bench/gpu_check.sh: a device probe, and the verdict on one check run's console output.

    python3 bench/gpu_check.py probe                 # key:value lines; probe_fail:<why> for what rules the GPU out
    python3 bench/gpu_check.py summarize --console gpu_check_console.txt --rc 0 [--probe probe.txt]
                                         [--setup-seconds S] [--wall-seconds S]

`summarize` reads what rank 0 printed (train_gpt's key:value lines, README "What the log says") interleaved with
TORCH_LOGS=recompiles, and prints one line per check: PASS / WARN / FAIL / INFO / N/A, then `gpu_check:PASS` or
`gpu_check:FAIL` (exit 1). Lines it does not know are ignored; the optional ones (calib_selfgen, precision:, fit:,
export timings, ...) are shown as INFO when present and never fail the check by their absence.

The limits come from #1453's logs (../shared/spec/reference-1453.md 13.1: 8xH100, 4,342 mean steps, peak 30.7 GB;
per-GPU 90/133/177 ms medians at depths 2/3/4 with 65,536 tokens per GPU per step) and the design in
../shared/spec/gpu-path-review.md. The speed limits apply to H100/H200-class GPUs only; elsewhere they are INFO.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

REFERENCE_STEPS = 4342  # #1453's 3-seed mean on 8xH100
RECORD_SECONDS = 600.0  # the challenge's training budget
RECORD_WORLD = 8
RECORD_VAL_BATCH = 524288  # VAL_BATCH_SIZE of the record run, tokens over all ranks
FULL_VAL_TARGETS = 62_021_632  # the sp1024 FineWeb validation stream (challenge-conventions.md)
ALL_REDUCE_MS = 0.5  # the 8-GPU gradient all-reduce a one-GPU step does not pay (gpu-path-review.md L2)
SKIP_AFTER_SWITCH = 3  # steps after each depth switch left out of the medians (warm caches, new graph)
FAST_GPUS = ("H100", "H200", "H800", "GH200")  # the class the speed limits are for
PEAK_BF16_TFLOPS = {"B200": 2250.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0,
                    "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}  # dense, no sparsity; name substrings

# name: (WARN above, FAIL above); None: no limit of that kind
STEP_MS_LIMITS = {2: (95.0, None), 3: (140.0, None), 4: (185.0, 210.0)}
LIMITS = {
    "compile_warmup_s": (180.0, None),
    "peak_allocated_gib": (None, 48.0),
    "artifact_s": (30.0, None),
    "eval_projection_s": (150.0, None),
    "optimizer_step_ms": (4.0, None),
    "mixer_mass_err": (None, 1e-6),
    "quant_penalty_bpb": (0.03, 0.10),  # #1453's SWA + quant gap was +0.0127 bpb; this guards a broken export
}
MIN_LOSS_DROP_NATS = 1.5  # mean of the last 50 train losses at least this far under the first 10's
PROJECTED_STEPS_WARN = 4300

NUM = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"


@dataclass
class Run:
    """What a check run's console says; None or empty where a line is absent."""
    config: dict = field(default_factory=dict)
    device: str | None = None
    world_size: int | None = None
    compile_on: bool | None = None
    val_tokens: int | None = None
    compile_warmup_ms: float | None = None
    steps: list[tuple[int, int, float, float]] = field(default_factory=list)  # step, repeats, train_time_ms, loss
    switches: list[tuple[int, int]] = field(default_factory=list)  # repeats, step
    val_losses: list[float] = field(default_factory=list)
    swa_checkpoints: int | None = None
    peak_allocated_mib: float | None = None
    peak_reserved_mib: float | None = None
    gptq_reserve_s: float | None = None
    calib_ms: float | None = None
    calib_over_budget: bool = False
    artifact: dict = field(default_factory=dict)  # gptq_fallbacks, time_ms, codec, *_bytes
    total_bytes: int | None = None
    over_budget: bool = False
    evals: dict = field(default_factory=dict)  # name -> {val_loss, val_bpb, eval_ms}
    exact: set = field(default_factory=set)  # names with a final_*_exact line
    quant_penalty: float | None = None
    mixer_mass_err: float | None = None
    recompiles: dict = field(default_factory=lambda: {"priming": 0, "training": 0, "after": 0})
    primed: dict = field(default_factory=dict)  # compiled function -> its recompiles while priming
    recompile_limit_hit: bool = False
    traceback: str | None = None
    info: list[str] = field(default_factory=list)  # optional lines shown as they are


INFO_PREFIXES = ("precision:", "fit:", "export", "calib_selfgen", "quant_levels", "artifact_over_budget",
                 "gptq_calib_over_budget", "stopping_early", "warning:", "swa:start", "ema:apply")


def fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+):(\S+)", line))


def parse(text: str) -> Run:
    run, phase = Run(), "priming"
    for line in text.splitlines():
        line = re.sub(r"^\[(rank|default)\d+\]:\s?", "", line)  # torchrun's per-rank prefix, where it adds one
        if recompiled := re.search(r"Recompiling function (\w+)", line):
            run.recompiles[phase] += 1
            if phase == "priming":
                run.primed[recompiled[1]] = run.primed.get(recompiled[1], 0) + 1
            continue
        if re.search(r"hit config\.(recompile_limit|cache_size_limit)", line):  # dynamo's fall-back-to-eager warning
            run.recompile_limit_hit = True
        if line.startswith("Traceback (most recent call last)"):
            run.traceback = run.traceback or "Traceback"
        elif run.traceback == "Traceback" and re.match(r"[\w.]+(Error|Exception|Interrupt)\b", line):
            run.traceback = line.strip()[:300]  # the first traceback's exception
        parse_line(run, line.strip())
        if line.startswith("compile_warmup_ms:"):
            phase = "training"
        elif phase == "training" and line.startswith(("peak_memory", "swa:apply", "ema:apply")):
            phase = "after"
    return run


def parse_line(run: Run, line: str) -> None:  # noqa: C901 (one branch per kind of log line)
    f = fields(line)
    if line.startswith("config:"):
        run.config = json.loads(line[len("config:"):])
    elif line.startswith("world_size:"):
        run.world_size, run.compile_on = int(f["world_size"]), f.get("compile") == "1"
        device = re.search(r"device:(.*?) grad_accum_steps:", line)
        run.device = device.group(1) if device else f.get("device")
    elif "val_tokens:" in line and line.split(":")[0] in ("val_tokens", "train_shards"):
        run.val_tokens = int(f["val_tokens"])
    elif line.startswith("compile_warmup_ms:"):
        run.compile_warmup_ms = float(f["compile_warmup_ms"])
    elif re.match(r"step:\d+/\d+ train_loss:", line):
        run.steps.append((int(f["step"].split("/")[0]), int(f["repeats"]), float(f["train_time"].rstrip("ms")),
                          float(f["train_loss"])))
    elif re.match(r"step:\d+/\d+ val_loss:", line):
        run.val_losses.append(float(f["val_loss"]))
    elif line.startswith("prog_depth:switch"):
        run.switches.append((int(f["repeats"]), int(f["step"])))
    elif line.startswith("swa:apply"):
        run.swa_checkpoints = int(f["checkpoints"])
    elif line.startswith("peak_memory allocated:"):
        run.peak_allocated_mib = float(f["allocated"].removesuffix("MiB"))
        run.peak_reserved_mib = float(f["reserved"].removesuffix("MiB"))
    elif line.startswith("gptq_reserve:"):
        run.gptq_reserve_s = float(f["gptq_reserve"].rstrip("s"))
    elif line.startswith("quant method:"):
        run.calib_ms = float(f["time_ms"])
    elif line.startswith("artifact path:"):
        run.artifact = {k: v for k, v in f.items() if k != "path"}
    elif line.startswith("artifact code_bytes:"):
        run.total_bytes = int(f["total_bytes"])
    elif re.match(r"final_\w+_exact val_loss:", line):
        run.exact.add(line.split()[0].removesuffix("_exact"))
    elif re.match(r"final_\w+ val_loss:", line):
        run.evals[line.split()[0]] = dict(val_loss=float(f["val_loss"]), val_bpb=float(f["val_bpb"]),
                                          eval_ms=float(f["eval_time"].rstrip("ms")))
    elif line.startswith("quant_penalty_bpb:"):
        run.quant_penalty = float(f["quant_penalty_bpb"])
    elif line.startswith("mixer_mass_max_abs_err:"):
        run.mixer_mass_err = float(f["mixer_mass_max_abs_err"])
    if line.startswith("artifact_over_budget"):
        run.over_budget = True
    if line.startswith("gptq_calib_over_budget"):
        run.calib_over_budget = True
    if line.startswith(INFO_PREFIXES):
        run.info.append(line)


# --- derived figures ---


def step_times(run: Run) -> dict[int, list[float]]:
    """Per depth, the ms of each logged step whose predecessor was logged too (TRAIN_LOG_EVERY=1 logs them all),
    leaving out SKIP_AFTER_SWITCH steps after the start and after each switch."""
    out: dict[int, list[float]] = {}
    since_switch, last = 0, None
    for step, repeats, train_ms, _ in run.steps:
        if last is not None and last[1] != repeats:
            since_switch = 0
        since_switch += 1
        if last is not None and step == last[0] + 1 and since_switch > SKIP_AFTER_SWITCH:
            out.setdefault(repeats, []).append(train_ms - last[2])
        last = (step, repeats, train_ms)
    return out


def recur_span(cfg: dict) -> tuple[int, int]:
    layers = [int(x) for x in str(cfg.get("recur_layers", "")).split(",") if x.strip()]
    return (layers[0], layers[-1] + 1) if layers else (0, cfg["num_layers"])


def train_flops_per_token(cfg: dict, repeats: int) -> float:
    """6 x matmul parameters per token (forward + backward) plus causal attention's 6 T d per layer."""
    d, hd = cfg["model_dim"], cfg["model_dim"] // cfg["num_heads"]
    lo, hi = recur_span(cfg)
    layers = cfg["num_layers"] + (repeats - 1) * (hi - lo)
    per_layer = d * (2 * d + 2 * cfg["num_kv_heads"] * hd) + 2 * d * int(cfg["mlp_mult"] * d)
    return 6.0 * (layers * per_layer + cfg["vocab_size"] * d) + 6.0 * layers * cfg["train_seq_len"] * d


def peak_tflops(device: str | None) -> float | None:
    for name, tflops in PEAK_BF16_TFLOPS.items():  # longest names first where one contains another
        if device and name in device:
            return tflops
    return None


def depth_phases(cfg: dict) -> list[tuple[float, int]]:
    """(fraction of the training budget, repeats) per PROG_DEPTH phase."""
    out, before = [], 0.0
    for part in cfg["prog_depth"].split(","):
        frac, reps = part.split(":")
        out.append((float(frac) - before, int(reps)))
        before = float(frac)
    return out


def projected_steps(cfg: dict, medians_ms: dict[int, float]) -> float | None:
    """Steps an 8xH100 run would reach if each of its GPUs stepped as fast as this one (plus the all-reduce):
    with the record's 600 s less the GPTQ reserve, each depth gets its PROG_DEPTH share of the time."""
    reserve = cfg.get("gptq_reserve_seconds", 0.0) if cfg.get("quant_method") == "gptq" and \
        cfg.get("gptq_calib") == "train" else 0.0
    budget_s, steps = RECORD_SECONDS - reserve, 0.0
    for frac, reps in depth_phases(cfg):
        if reps not in medians_ms:
            return None
        steps += frac * budget_s * 1000.0 / (medians_ms[reps] + ALL_REDUCE_MS)
    return steps


def windows(total: int, window: int, stride: int) -> int:
    """Rows of train_gpt's window_plan(total, window, stride)."""
    length = min(window, total)
    return len(range(length, total, stride)) + 1


def eval_projection(run: Run) -> dict[str, float]:
    """Each final eval's seconds at 8xH100 scale: this run's per-batch time times the record's batch count (a
    one-GPU batch is one rank's share of a global batch); the mixer's own work scales with the targets it mixes."""
    cfg, world = run.config, run.world_size or 1
    if not cfg or not run.val_tokens:
        return {}
    seq, here = cfg["train_seq_len"], run.val_tokens
    accum = cfg.get("grad_accum_steps") or max(1, 8 // world)
    rows_here = max(1, cfg["val_batch_size"] // (world * accum * seq))
    rows_record = RECORD_VAL_BATCH // (RECORD_WORLD * seq)  # one rank's rows in the record run
    block_batches = math.ceil(windows(here, seq, seq) / (rows_here * world))
    block_record = math.ceil(windows(FULL_VAL_TARGETS, seq, seq) / (rows_record * RECORD_WORLD))
    out = {}
    for name in ("final_float", "final_roundtrip"):
        if name in run.evals:
            out[name] = run.evals[name]["eval_ms"] / 1000 / block_batches * block_record
    if "final_sliding_window" in run.evals and cfg.get("eval_stride"):
        win, stride, bs = cfg["eval_seq_len"], cfg["eval_stride"], cfg["eval_batch_seqs"]
        batches = math.ceil(windows(here, win, stride) / (bs * world))
        record = math.ceil(windows(FULL_VAL_TARGETS, win, stride) / (bs * RECORD_WORLD))
        sliding_ms = run.evals["final_sliding_window"]["eval_ms"]
        out["final_sliding_window"] = sliding_ms / 1000 / batches * record
        for name in ("final_mixer", "final_hedge_reference"):
            if name in run.evals:
                mixer_s = (run.evals[name]["eval_ms"] - sliding_ms) / 1000 / here * FULL_VAL_TARGETS
                out[name] = out["final_sliding_window"] + mixer_s
    return out


# --- verdicts ---


@dataclass
class Check:
    status: str  # PASS | WARN | FAIL | INFO | N/A
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<4} {self.name}: {self.detail}"


def limit_check(name: str, value: float | None, text: str, warn: float | None = None, fail: float | None = None,
                enforce: bool = True) -> Check:
    if value is None:
        return Check("N/A", name, "absent")
    if value != value:  # NaN
        return Check("FAIL", name, f"{text} (NaN)")
    status = "PASS"
    if warn is not None and value > warn:
        status = "WARN"
    if fail is not None and value > fail:
        status = "FAIL"
    if not enforce and status != "PASS":
        status = "INFO"
    bounds = " ".join(f"{k}>{v:g}" for k, v in (("warn", warn), ("fail", fail)) if v is not None)
    return Check(status, name, f"{text} ({bounds})" if bounds else text)


def probe_checks(probe_text: str) -> tuple[list[Check], float | None]:
    checks, optimizer_ms = [], None
    for line in probe_text.splitlines():
        if line.startswith("probe_fail:"):
            checks.append(Check("FAIL", "probe", line.removeprefix("probe_fail:").strip()))
        elif line.startswith("probe_optimizer_step_ms:"):
            value = line.split(":", 1)[1].split()[0]
            optimizer_ms = float(value) if re.fullmatch(NUM, value) else None
        elif line.startswith("probe"):
            checks.append(Check("INFO", "probe", line))
    return checks, optimizer_ms


def required_checks(run: Run) -> list[Check]:
    cfg, checks = run.config, []
    need_switches = len(depth_phases(cfg)) - 1 if cfg else 2
    want = {"compile_warmup_ms": run.compile_warmup_ms is not None,
            f"prog_depth:switch x{need_switches}": len(run.switches) >= need_switches,
            "artifact path line": bool(run.artifact), "artifact size line": run.total_bytes is not None}
    if cfg.get("swa_enabled", True) and not cfg.get("ema_decay"):
        want["swa:apply checkpoints>=2"] = (run.swa_checkpoints or 0) >= 2
    finals = ["final_float", "final_roundtrip"]
    if cfg.get("eval_stride", 1):
        finals.append("final_sliding_window")
        if cfg.get("mixer", "normalized") != "off":
            finals.append("final_mixer" if cfg.get("mixer", "normalized") == "normalized" else "final_hedge_reference")
    for name in finals:
        want[f"{name}_exact"] = name in run.exact
    missing = [name for name, ok in want.items() if not ok]
    checks.append(Check("FAIL" if missing else "PASS", "required lines",
                        f"missing {', '.join(missing)}" if missing else f"all {len(want)} present"))
    return checks


def training_checks(run: Run, fast_gpu: bool) -> list[Check]:
    checks = []
    losses = [loss for *_, loss in run.steps]
    if not losses:
        return [Check("FAIL", "train loss", "no step lines (TRAIN_LOG_EVERY=1 logs every step)")]
    bad = [x for x in losses + run.val_losses if not math.isfinite(x)]
    first, last = statistics.mean(losses[:10]), statistics.mean(losses[-50:])
    drop_ok = not bad and first - last >= MIN_LOSS_DROP_NATS
    checks.append(Check("PASS" if drop_ok else "FAIL", "train loss",
                        f"first 10 mean {first:.3f}, last 50 mean {last:.3f} (drop {first - last:.3f}, want >= "
                        f"{MIN_LOSS_DROP_NATS}){' non-finite: ' + str(bad[:3]) if bad else ''} over {len(losses)} "
                        f"steps"))
    per_depth = step_times(run)
    medians = {r: statistics.median(ms) for r, ms in per_depth.items()}
    cfg = run.config
    peak = peak_tflops(run.device)
    tokens = cfg.get("train_batch_tokens", 0) / (run.world_size or 1)
    for reps in sorted(set(STEP_MS_LIMITS) | set(medians)):
        if reps not in medians:
            continue
        ms = medians[reps]
        tflops = train_flops_per_token(cfg, reps) * tokens / (ms / 1000) / 1e12 if cfg else float("nan")
        mfu = f" MFU {100 * tflops / peak:.1f}% of {peak:g}" if peak else " MFU n/a (unknown GPU peak)"
        warn, fail = STEP_MS_LIMITS.get(reps, (None, None))
        checks.append(limit_check(f"step depth {reps}", ms, f"median {ms:.1f} ms over {len(per_depth[reps])} steps, "
                                  f"{tokens / (ms / 1000):,.0f} tokens/s, {tflops:.1f} TFLOP/s{mfu}", warn, fail,
                                  enforce=fast_gpu))
    for reps in sorted({r for _, r in depth_phases(cfg)} - set(medians)):
        checks.append(Check("FAIL", f"step depth {reps}", "no timed steps at this depth"))
    steps = projected_steps(cfg, medians) if cfg else None
    if steps is None:
        checks.append(Check("N/A", "projected 8xH100 steps", "a depth without timed steps"))
    else:
        status = "PASS" if steps >= PROJECTED_STEPS_WARN else "WARN"
        checks.append(Check(status if fast_gpu else "INFO", "projected 8xH100 steps",
                            f"{steps:,.0f} vs #1453's {REFERENCE_STEPS:,} (warn<{PROJECTED_STEPS_WARN}; this GPU's "
                            f"medians + {ALL_REDUCE_MS} ms all-reduce, {RECORD_SECONDS:g} s less the GPTQ reserve)"))
    return checks


def import_train_gpt():
    """The checkout's train_gpt.py (this file is in its bench/)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import train_gpt

    return train_gpt


def primed_graphs(cfg: dict) -> dict[str, int]:
    """The graphs each compiled function gets before the clock: the model's forward one per depth and grad mode,
    and one for the sliding eval; Newton-Schulz one per shape bucket of train_gpt's own Muon (on a meta model)."""
    train_gpt = import_train_gpt()
    forward = 2 * len({r for _, r in depth_phases(cfg)}) + (1 if cfg.get("eval_stride") else 0)
    knobs = {f.name for f in dataclasses.fields(train_gpt.Config)}
    try:  # dry_run: a codec missing here is not this check's business
        config = train_gpt.Config(**{**{k: v for k, v in cfg.items() if k in knobs}, "dry_run": True})
    except (TypeError, ValueError):  # the console of another train_gpt version: its knobs differ
        return {"forward": forward}
    muon = train_gpt.build_optimizers(train_gpt.meta_model(config), config, fused=False)["muon"]
    return {"forward": forward, "newton_schulz": len(muon.buckets())}


def compile_checks(run: Run) -> list[Check]:
    cfg, rc = run.config, run.recompiles
    graphs = primed_graphs(cfg) if cfg else {"forward": 7}
    over = [name for name, n in run.primed.items() if n > graphs.get(name, 1) - 1]  # an unknown function: 1 graph
    wanted = ", ".join(f"{name} {n - 1} ({n} graphs)" for name, n in graphs.items())
    checks = [limit_check("compile warm-up", None if run.compile_warmup_ms is None else run.compile_warmup_ms / 1000,
                          f"{(run.compile_warmup_ms or 0) / 1000:.1f} s before the clock", *LIMITS["compile_warmup_s"])]
    if run.compile_on is False:
        checks.append(Check("FAIL", "compile", "the run did not compile (compile:0)"))
    checks.append(Check("FAIL" if over else "PASS", "recompiles while priming",
                        f"{rc['priming']} (want at most: {wanted})" + (f"; over: {', '.join(over)}" if over else "")))
    checks.append(Check("FAIL" if rc["training"] else "PASS", "recompiles during training",
                        f"{rc['training']} (want 0)"))
    checks.append(Check("WARN" if rc["after"] else "PASS", "recompiles in export + evals", f"{rc['after']} (want 0)"))
    if run.recompile_limit_hit:
        checks.append(Check("FAIL", "recompile limit", "dynamo hit its recompile limit: a graph fell back to eager"))
    return checks


def export_checks(run: Run) -> list[Check]:
    checks = []
    peak = None if run.peak_allocated_mib is None else run.peak_allocated_mib / 1024
    reserved = f", reserved {run.peak_reserved_mib / 1024:.1f} GiB" if run.peak_reserved_mib is not None else ""
    checks.append(limit_check("peak memory", peak, f"allocated {peak or 0:.1f} GiB{reserved} (#1453: 29.9 GiB)",
                              *LIMITS["peak_allocated_gib"]))
    if run.calib_ms is None:
        checks.append(Check("N/A", "calibration", "no quant method:gptq line"))
    else:
        reserve_ms = 1000 * run.gptq_reserve_s if run.gptq_reserve_s is not None else None
        over = run.calib_over_budget or (reserve_ms is not None and run.calib_ms > reserve_ms)
        checks.append(Check("FAIL" if over else "PASS", "calibration",
                            f"{run.calib_ms / 1000:.2f} s (reserve {run.gptq_reserve_s if reserve_ms else 'none'} s)"))
    if run.artifact:
        fallbacks = int(run.artifact.get("gptq_fallbacks", 0))
        sizes = " ".join(f"{k}:{v}" for k, v in run.artifact.items() if k.endswith("_bytes") or k == "codec")
        checks.append(Check("FAIL" if fallbacks else "PASS", "gptq fallbacks", f"{fallbacks} (want 0)"))
        seconds = float(run.artifact["time_ms"]) / 1000 if "time_ms" in run.artifact else None
        checks.append(limit_check("artifact time", seconds, f"{seconds or 0:.1f} s {sizes} total_bytes:"
                                  f"{run.total_bytes}", *LIMITS["artifact_s"]))
    if run.over_budget:
        checks.append(Check("WARN", "artifact size", "artifact_over_budget (demo data; the exit code is 1 for it)"))
    checks.append(limit_check("quant penalty", run.quant_penalty, f"{run.quant_penalty} bpb roundtrip - float",
                              *LIMITS["quant_penalty_bpb"]))
    checks.append(limit_check("mixer mass error", run.mixer_mass_err, f"{run.mixer_mass_err}",
                              *LIMITS["mixer_mass_err"]))
    return checks


def eval_checks(run: Run, fast_gpu: bool) -> list[Check]:
    checks, projection = [], eval_projection(run)
    for name, ev in run.evals.items():
        at_scale = f", ~{projection[name]:.1f} s at 8xH100 scale" if name in projection else ""
        checks.append(Check("INFO", name, f"val_bpb {ev['val_bpb']:.4f} eval {ev['eval_ms'] / 1000:.2f} s{at_scale}"))
    total = sum(v for k, v in projection.items() if k != "final_sliding_window" or "final_mixer" not in projection)
    if projection:
        check = limit_check("evals at 8xH100 scale", total, f"{total:.1f} s projected (float + roundtrip + "
                            f"{'mixer pass' if 'final_mixer' in projection else 'sliding'})",
                            *LIMITS["eval_projection_s"], enforce=fast_gpu)
        checks.append(check)
    return checks


def verdict(run: Run, rc: int, probe_text: str = "", setup_s: float | None = None,
            wall_s: float | None = None) -> list[Check]:
    fast_gpu = any(name in (run.device or "") for name in FAST_GPUS)
    checks, optimizer_ms = probe_checks(probe_text)
    checks.append(Check("INFO", "device", f"{run.device} world_size:{run.world_size} (speed limits "
                        f"{'enforced: H100/H200 class' if fast_gpu else 'not enforced: not an H100/H200-class GPU'})"))
    explained = rc == 1 and run.over_budget and run.traceback is None
    checks.append(Check("PASS" if rc == 0 else "WARN" if explained else "FAIL", "exit code", f"{rc}"))
    if run.traceback:
        checks.append(Check("FAIL", "traceback", run.traceback))
    if not run.config:
        return checks + [Check("FAIL", "run", "no config: line: train_gpt.py did not start")]
    checks += required_checks(run) + compile_checks(run) + training_checks(run, fast_gpu)
    checks.append(limit_check("optimizer step", optimizer_ms, f"{optimizer_ms} ms (probe, 20 steps)",
                              *LIMITS["optimizer_step_ms"], enforce=fast_gpu))
    checks += export_checks(run) + eval_checks(run, fast_gpu)
    checks += [Check("INFO", "log", line) for line in run.info]
    for name, seconds in (("setup", setup_s), ("wall", wall_s)):
        if seconds is not None:
            checks.append(Check("INFO", f"{name} time", f"{seconds:.0f} s"))
    return checks


def summarize(args: argparse.Namespace) -> int:
    text = Path(args.console).read_text(encoding="utf-8", errors="replace") if Path(args.console).is_file() else ""
    probe = Path(args.probe).read_text(encoding="utf-8", errors="replace") if args.probe else ""
    checks = verdict(parse(text), args.rc, probe, args.setup_seconds, args.wall_seconds)
    failed = [c for c in checks if c.status == "FAIL"]
    print("\n".join(c.line() for c in checks))
    warned = sum(c.status == "WARN" for c in checks)
    print(f"gpu_check:{'FAIL' if failed else 'PASS'} fails:{len(failed)} warns:{warned}")
    return 1 if failed else 0


# --- the probe (needs torch; imported only here) ---


def probe() -> int:
    import importlib.util
    import platform
    import time

    import torch
    import torch.nn.functional as F

    fails = []
    version = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else "none"
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0.0
    print(f"probe python:{platform.python_version()} torch:{torch.__version__} cuda:{torch.version.cuda} "
          f"device:{name.replace(' ', '_')} gpus:{torch.cuda.device_count() if cuda else 0} memory_gib:{memory:.0f}")
    missing = [m for m in ("numpy", "sentencepiece", "zstandard", "brotli") if importlib.util.find_spec(m) is None]
    print(f"probe_imports missing:{','.join(missing) or 'none'} torch.optim.Muon:{int(hasattr(torch.optim, 'Muon'))}")
    if missing:
        fails.append(f"missing modules {', '.join(missing)} (pip install -r requirements.txt)")
    if version < (2, 5):
        fails.append(f"torch {torch.__version__} < 2.5 (SDPA enable_gqa)")
    if not cuda:
        fails.append("no CUDA device")
    else:
        fails += probe_flash(torch, F)
        print(f"probe_optimizer_step_ms:{probe_optimizer(torch, time)}")
    for why in fails:
        print(f"probe_fail:{why}")
    return 1 if fails else 0


def probe_flash(torch, F) -> list[str]:
    """Is FlashAttention eligible for the record's bf16 shapes: q (64, 8, 1024, 110), k/v (64, 4, 1024, 110), GQA?"""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(64, 8, 1024, 110, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(64, 4, 1024, 110, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.cuda.synchronize()
    except RuntimeError as err:
        print(f"probe_flash eligible:0 error:{str(err).splitlines()[0][:200]}")
        return ["FlashAttention is not eligible for bf16 head_dim 110 with GQA"]
    print("probe_flash eligible:1")
    return []


def probe_optimizer(torch, time) -> str:
    """Median ms of one step of every optimizer of the full model on random gradients (20 steps after 3)."""
    try:
        train_gpt = import_train_gpt()
        cfg = train_gpt.Config.from_env({})
        model = train_gpt.GPT(cfg).cuda()
        train_gpt.apply_param_dtypes(model)
        optimizers = train_gpt.build_optimizers(model, cfg, fused=True)
        times = []
        for i in range(23):
            for p in model.parameters():
                p.grad = torch.randn_like(p) * 1e-3
            torch.cuda.synchronize()
            start = time.perf_counter()
            for opt in optimizers.values():
                opt.step()
            torch.cuda.synchronize()
            times.append(1000 * (time.perf_counter() - start))
        return f"{statistics.median(times[3:]):.2f}"
    except Exception as err:  # the probe reports; the main run is the judge
        return f"n/a error:{type(err).__name__}:{str(err)[:150]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("probe")
    s = sub.add_parser("summarize")
    s.add_argument("--console", required=True)
    s.add_argument("--rc", type=int, required=True)
    s.add_argument("--probe", default="")
    s.add_argument("--setup-seconds", type=float)
    s.add_argument("--wall-seconds", type=float)
    args = parser.parse_args()
    return probe() if args.command == "probe" else summarize(args)


if __name__ == "__main__":
    sys.exit(main())
