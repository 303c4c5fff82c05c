"""Write a finished run's records folder, records/<track>/<date>_<name>/: the one folder a submission PR adds.

    python3 records/make_record.py --log logs/<RUN_ID>.txt [--script train_gpt.py] [--template submission.json]
                                   [--records-root records] [--headline final_mixer]

train_gpt.py runs this at the end of every complete run (rank 0, RECORD=1, when records/make_record.py sits next to
it); run it by hand to record a log afterwards. It lives outside train_gpt.py because that file's bytes count against
the 16,000,000-byte artifact. Defaults: --script train_gpt.py, --template and requirements.txt from beside the
script, --records-root records (relative to the working directory, like logs/).

The folder holds, and nothing a previous run wrote is overwritten:
  train_gpt.py        the script that ran, byte-identical (checked: the log starts with this file's source)
  train_gpt_readable.py  when that script is packed (records/pack_script.py): its readable source, not counted
  requirements.txt    copied from beside the script
  train_seed<S>.log   the run's log, its .jsonl beside it, and its artifact as .ptz when the log names one; a seed
                      already present keeps its files and the new run becomes train_seed<S>_<RUN_ID>.log
  submission.json     the template + fields measured over all the folder's logs (measured keys are recomputed,
                      template keys win over the folder's copy, keys only the folder's copy has are kept)
  README.md           results, config, reproduction and significance commands, regenerated between two markers;
                      text outside the markers is the entrant's and is kept
  train_curve.png     train loss and val_bpb against step and training time (matplotlib; skipped without it)

Folder name: <date>_<name>, date = the run's start date, name = the template's, sanitized. Only a challenge
submission goes to records/<track>/: a run on the challenge's FineWeb validation split in full (recognised by content:
no VAL_MAX_TOKENS cap and the split's token count logged for that tokenizer, 62,021,632 for sp1024) within the budget
(artifact <= 16,000,000 bytes; on track_10min_16mb also train and eval <= 600 s). Any other run goes to
records/not_a_submission/<date>_<name>_<why>/, why = demo (data/prepare_demo.py's corpus), capped (VAL_MAX_TOKENS),
custom (other data) or over_budget, and its compliance block says so (val_split, challenge_submission). A run joins an existing folder of that name only when its train_gpt.py is
byte-identical and its configuration equal apart from seed and run id; otherwise it gets a new folder (_2, _3, ...),
so seeds of different code or configuration are never averaged together.
Newest run per seed: the latest start time (the log's `started:`, else a generated RUN_ID's timestamp, else the
log's modification time), ties broken by file name; older runs of a seed stay and are listed as superseded.
Headline metric: --headline, else one pinned earlier with --headline (headline_metric_override in submission.json),
else the first of final_ttt, final_mixer, final_sliding_window, final_roundtrip, final_float that every counted
run logged.

stdout gets one line, which train_gpt.py relays into the run's log: `record:written path:<folder> ...` (exit 0) or
`record:skipped reason:...` (exit 2); notes go to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import significance  # noqa: E402  (one definition of the exact lines and of the metric priority)
import pack_script  # noqa: E402  (a packed train_gpt.py names its readable source)

TRACKS = ("track_10min_16mb", "track_non_record_16mb")
NOT_A_SUBMISSION = "not_a_submission"  # records/<this>/: runs that are not on the challenge's data or budget
# The challenge's logged val token counts (the full FineWeb val split cut to whole 1024-token blocks) by tokenizer
# vocabulary: ../shared/spec/challenge-conventions.md 1.7 (sp4096's is known only to 0.01 M, so it is not listed).
CHALLENGE_VAL_TOKENS = {1024: 62_021_632, 8192: 40_540_160}
BUDGET_BYTES = 16_000_000
LIMIT_SECONDS = 600.0  # training, and separately evaluation, on 8xH100
# Config keys that may differ between the seeds of one submission (and are not knobs of the reproduction command).
PER_RUN_KEYS = ("seed", "run_id", "resume", "record", "checkpoint_every_seconds")
MEASURED_KEYS = ("date", "val_loss", "val_bpb", "bytes_total", "bytes_code", "headline_metric", "val_loss_std",
                 "val_bpb_std", "seeds", "seed_results", "superseded_runs", "hardware", "pytorch_version",
                 "compliance")
LAUNCH_KEYS = ("author", "github_id", "name", "blurb", "date", "val_loss", "val_bpb", "bytes_total", "bytes_code")
PLACEHOLDER = re.compile(r"^<.*>$", re.S)  # template values still to be filled in look like "<your name>"
README_BEGIN = "<!-- make_record:begin (regenerated after every run; write your own text outside these markers) -->"
README_END = "<!-- make_record:end -->"

LINE = {name: re.compile(pattern, re.M) for name, pattern in dict(
    torch=r"^python:\S+ torch:(\S+)$",
    header=r"^logs:\S+ run_id:(\S+)(.*)$",
    config=r"^config:(\{.*\})$",
    world=r"^world_size:(\d+) device:(.*?) grad_accum_steps:",
    seed=r"^train_shards:\d+ val_tokens:\d+ seed:(\d+)$",
    train=r"^step:(\d+)/\d+ train_loss:(\S+) .*?train_time:([\d.]+)ms",
    val=r"^step:(\d+)/\d+ val_loss:\S+ val_bpb:(\S+) train_time:([\d.]+)ms",
    depth=r"^prog_depth:switch repeats:(\d+) step:(\d+)",
    swa=r"^swa:start step:(\d+)",
    eval_time=r"^final_\w+ val_loss:\S+ val_bpb:\S+ .*?eval_time:([\d.]+)ms",
    penalty=r"^quant_penalty_bpb:(\S+)",
    sizes=r"^artifact\b.*?code_bytes:(\d+) model_bytes:(\d+) total_bytes:(\d+)",
    artifact=r"^artifact\b.*?([^\s:]+\.ptz)\b",
    val_split=r"^val_split tokens:(\d+) val_max_tokens:\d+$",
).items()}


class RecordError(Exception):
    """Why no record was written: one line, exit code 2."""


def note(message: str) -> None:
    print(f"record:note {message}", file=sys.stderr)


# --- reading a run's log ---


@dataclass
class Run:
    log: Path
    run_id: str
    seed: int
    started: float  # POSIX seconds of the last start (a resume or a reused RUN_ID appends a new header)
    date: str  # YYYY-MM-DD of the first start
    config: dict
    hardware: str
    torch_version: str
    exact: dict[str, tuple[float, float]]  # `<name>_exact val_loss:… val_bpb:…` -> (val_loss, val_bpb)
    steps: int
    train_ms: float
    eval_ms: float | None  # sum of the final evals' times
    penalty_bpb: float | None = None
    sizes: dict[str, int] = field(default_factory=dict)  # code_bytes, model_bytes, total_bytes
    artifact: str | None = None  # the .ptz path the log names
    train_points: dict[int, tuple[float, float]] = field(default_factory=dict)  # step -> (loss, ms)
    val_points: dict[int, tuple[float, float]] = field(default_factory=dict)  # step -> (bpb, ms)
    depth_switches: list[tuple[int, int]] = field(default_factory=list)  # (step, repeats)
    swa_start: int | None = None
    val_split_tokens: int | None = None  # tokens in the val shards, before any cap (the `val_split` line)


def segments(text: str, source: str, path: Path) -> list[str]:
    """The console part of every run in the log. The log is (source, console lines)+; resuming appends a block."""
    head = source + "\n"
    if not text.startswith(head):
        raise RecordError(f"{path} does not start with the script's source (a log of another train_gpt.py)")
    return text.split(head)[1:]


def start_of(segment: str, run_id: str, path: Path) -> tuple[float, str]:
    """(POSIX seconds, date) of a start: the header's started:, else a generated RUN_ID's stamp, else the mtime."""
    header = LINE["header"].search(segment)
    stamp = re.search(r"\bstarted:(\S+)", header.group(2)) if header else None
    if stamp:
        when = dt.datetime.strptime(stamp.group(1), "%Y-%m-%dT%H:%M:%S%z")
    elif re.fullmatch(r"\d{8}_\d{6}_[0-9a-f]{6}", run_id):
        when = dt.datetime.strptime(run_id[:15], "%Y%m%d_%H%M%S")
    else:
        when = dt.datetime.fromtimestamp(path.stat().st_mtime)
    return when.timestamp(), when.date().isoformat()


def final_eval_ms(jsonl: Path, last: str) -> float | None:
    """Sum of the final evals' times: the .jsonl records after the last "val" one, else the log's eval_time:."""
    if jsonl.is_file():
        records = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
        finals = list(itertools.takewhile(lambda r: r.get("name") != "val", reversed(records)))
        if finals:
            return sum(float(r.get("eval_time_ms", 0.0)) for r in finals)
    times = LINE["eval_time"].findall(last)
    return sum(map(float, times)) if times else None


def parse_log(path: Path, source: str) -> Run:
    """One run from its log; curves merge every block (a later block wins a step), the rest is the last block's."""
    blocks = segments(path.read_text(encoding="utf-8", errors="replace"), source, path)
    last = blocks[-1]
    exact = {name: (float(loss), float(bpb)) for name, loss, bpb in significance.EXACT_LINE.findall(last)}
    needed = {k: LINE[k].search(last) for k in ("header", "config", "world", "seed", "torch", "val")}
    missing = [k for k, m in needed.items() if m is None]
    if missing or not exact:
        raise RecordError(f"{path} is not a finished run (no {', '.join(missing) or '<name>_exact'} line)")
    run_id = needed["header"].group(1)
    started = start_of(last, run_id, path)[0]
    world = needed["world"]
    val_lines = LINE["val"].findall(last)
    run = Run(log=path, run_id=run_id, seed=int(needed["seed"].group(1)), started=started,
              date=start_of(blocks[0], run_id, path)[1], config=json.loads(needed["config"].group(1)),
              hardware=f"{world.group(1)}x{world.group(2)}", torch_version=needed["torch"].group(1), exact=exact,
              steps=int(val_lines[-1][0]), train_ms=float(val_lines[-1][2]),
              eval_ms=final_eval_ms(path.with_suffix(".jsonl"), last))
    if m := LINE["penalty"].search(last):
        run.penalty_bpb = float(m.group(1))
    if m := LINE["sizes"].search(last):
        run.sizes = dict(zip(("code_bytes", "model_bytes", "total_bytes"), map(int, m.groups())))
    if m := LINE["artifact"].search(last):
        run.artifact = m.group(1)
    if m := LINE["val_split"].search(last):
        run.val_split_tokens = int(m.group(1))
    for block in blocks:
        run.train_points.update({int(s): (float(x), float(ms)) for s, x, ms in LINE["train"].findall(block)})
        run.val_points.update({int(s): (float(x), float(ms)) for s, x, ms in LINE["val"].findall(block)})
    run.depth_switches = [(int(s), int(r)) for r, s in LINE["depth"].findall(last)]
    swa = LINE["swa"].findall(last)
    run.swa_start = int(swa[0]) if swa else None
    return run


def fingerprint(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in PER_RUN_KEYS}


def folder_runs(folder: Path, source: str) -> list[Run]:
    """Every finished run of this script logged in the folder, oldest first (a foreign .log is skipped)."""
    runs = []
    for path in sorted(folder.glob("*.log")):
        try:
            runs.append(parse_log(path, source))
        except RecordError as err:
            note(f"skipped {path.name}: {err}")
    return sorted(runs, key=lambda r: (r.started, r.log.name))


def newest_per_seed(runs: list[Run]) -> tuple[list[Run], list[tuple[Run, Run]]]:
    """(the newest run of each seed, by seed; [(older run, the run that supersedes it)]); runs come oldest first."""
    latest: dict[int, Run] = {}
    for run in runs:
        latest[run.seed] = run
    superseded = [(run, latest[run.seed]) for run in runs if latest[run.seed] is not run]
    return sorted(latest.values(), key=lambda r: r.seed), superseded


# --- the script, the template and the folder ---


def load_script(script: Path):
    """The script's own module (importing it is side-effect free): Config defaults and PRESETS."""
    name = "_recorded_" + hashlib.sha256(script.read_bytes()).hexdigest()[:16]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[name]
            raise RecordError(f"cannot import {script}: {err}") from None
    return sys.modules[name]


def sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")


def load_template(path: Path) -> dict:
    if not path.is_file():
        raise RecordError(f"no template {path} (copy the repository's submission.json and fill it in)")
    template = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(template, dict) or not sanitize(str(template.get("name", ""))):
        raise RecordError(f"{path} must be a JSON object with a name (it names the folder)")
    if track_folder(template) not in TRACKS:
        raise RecordError(f"{path}: track {template.get('track')!r} is not one of {', '.join(TRACKS)}")
    unfilled = [k for k, v in template.items() if isinstance(v, str) and PLACEHOLDER.match(v)]
    if unfilled:
        note(f"template fields still to fill in ({path}): {', '.join(unfilled)}")
    return template


def track_folder(template: dict) -> str:
    return "track_" + str(template.get("track", "track_non_record_16mb")).removeprefix("track_")


def is_demo(config: dict, module) -> bool:
    """Trained on the embedded demo corpus (PRESET=demo's data folder): never mistaken for a real submission."""
    demo_data = module.PRESETS.get("demo", {}).get("data_path")
    return bool(demo_data) and Path(config["data_path"]).name == Path(demo_data).name


def val_split(run: Run, module) -> str:
    """fineweb (the challenge's full val split, recognised by its token count), demo, capped or custom."""
    if is_demo(run.config, module):
        return "demo"
    if run.config.get("val_max_tokens"):
        return "capped"
    want, tokens = CHALLENGE_VAL_TOKENS.get(run.config.get("vocab_size")), run.val_split_tokens
    return "fineweb" if want and tokens and (tokens - 1) // 1024 * 1024 == want else "custom"


def not_a_submission(run: Run, template: dict, module) -> str:
    """Why the run is no challenge submission ('' when it is one): its val_split, or over_budget."""
    split = val_split(run, module)
    if split != "fineweb":
        return split
    limit_ms = 1000 * LIMIT_SECONDS if track_folder(template) == "track_10min_16mb" else math.inf
    over = run.sizes.get("total_bytes", 0) > BUDGET_BYTES or max(run.train_ms, run.eval_ms or 0.0) > limit_ms
    return "over_budget" if over else ""


def choose_folder(track_dir: Path, base: str, run: Run, code: bytes, source: str) -> Path:
    """The folder of this name holding the same code and configuration, else a new one (suffix _2, _3, ...)."""
    same_name = re.compile(rf"\d{{4}}-\d{{2}}-\d{{2}}_{re.escape(base)}(_\d+)?")
    for folder in sorted(track_dir.glob("*")) if track_dir.is_dir() else []:
        script = folder / "train_gpt.py"
        if not (same_name.fullmatch(folder.name) and script.is_file() and script.read_bytes() == code):
            continue
        if all(fingerprint(r.config) == fingerprint(run.config) for r in folder_runs(folder, source)):
            return folder
        note(f"{folder} holds another configuration of this code; this run gets its own folder")
    folder = track_dir / f"{run.date}_{base}"
    for k in itertools.count(2):
        if not folder.exists():
            return folder
        folder = track_dir / f"{run.date}_{base}_{k}"


def same_run(a: bytes, b: bytes, source: bytes) -> bool:
    """One log is the other plus trailing lines of the same run (e.g. the `record:written` line appended later)."""
    short, long = sorted((a, b), key=len)
    return long.startswith(short) and source not in long[len(short):]


def copy_new(src: Path, dst: Path) -> bool:
    """Copy unless dst exists: an earlier run's file is never replaced."""
    if dst.exists():
        if dst.read_bytes() != src.read_bytes():
            note(f"kept the existing {dst} (differs from {src})")
        return False
    shutil.copyfile(src, dst)
    return True


def add_log(folder: Path, log: Path, run: Run, source: str) -> tuple[str, bool]:
    """Copy the log (+ .jsonl, + artifact) under a free name; (its name in the folder, whether it was new)."""
    text = log.read_bytes()
    for existing in sorted(folder.glob("*.log")):
        if same_run(existing.read_bytes(), text, source.encode("utf-8")):
            return existing.name, False
    stem = f"train_seed{run.seed}"
    names = itertools.chain([stem], (f"{stem}_{sanitize(run.run_id)}" + (f"_{k}" if k > 1 else "")
                                     for k in itertools.count(1)))
    stem = next(n for n in names if not any(folder.glob(f"{glob_escape(n)}.*")))
    shutil.copyfile(log, folder / f"{stem}.log")
    if log.with_suffix(".jsonl").is_file():
        shutil.copyfile(log.with_suffix(".jsonl"), folder / f"{stem}.jsonl")
    if run.artifact:
        found = [p for p in (Path(run.artifact), log.parent.parent / run.artifact) if p.is_file()]
        if found:
            shutil.copyfile(found[0], folder / f"{stem}.ptz")
        else:
            note(f"the log names the artifact {run.artifact}, which is not there; not copied")
    return f"{stem}.log", True


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


# --- what the folder reports ---


def choose_headline(runs: list[Run], wanted: str | None) -> str:
    if wanted:
        lacking = [r.log.name for r in runs if wanted not in r.exact]
        if lacking:
            raise RecordError(f"headline {wanted} is not in {', '.join(lacking)}")
        return wanted
    for name in significance.METRIC_PRIORITY:
        if all(name in r.exact for r in runs):
            return name
    raise RecordError("no metric of " + ", ".join(significance.METRIC_PRIORITY) + " is in every counted log")


def model_bytes(run: Run, folder: Path) -> int | None:
    """The compressed model's size: the log's artifact line, else the copied artifact's file size."""
    if "model_bytes" in run.sizes:
        return run.sizes["model_bytes"]
    copy = folder / (run.log.stem + ".ptz")
    return copy.stat().st_size if copy.is_file() else None


def seed_result(run: Run, metric: str, folder: Path, code_bytes: int) -> dict:
    result = dict(run_id=run.run_id, log=run.log.name, val_loss=run.exact[metric][0], val_bpb=run.exact[metric][1])
    result.update({name: dict(val_loss=loss, val_bpb=bpb) for name, (loss, bpb) in run.exact.items()})
    if run.penalty_bpb is not None:
        result["quant_penalty_bpb"] = run.penalty_bpb
    result.update(steps=run.steps, train_time_ms=round(run.train_ms))
    if run.eval_ms is not None:
        result["eval_seconds"] = round(run.eval_ms / 1000, 3)
    model = model_bytes(run, folder)
    if model is not None:
        # The total counts the code in this folder: the bytes a reviewer measures.
        result.update(model_bytes=model, artifact_bytes=code_bytes + model)
        if run.sizes.get("total_bytes") not in (None, code_bytes + model):
            note(f"{run.log.name} logs total_bytes:{run.sizes['total_bytes']}, the folder's code + model is "
                 f"{code_bytes + model}")
    return result


def compliance(results: list[dict]) -> dict:
    """Only what the logs show: the limits on training time, evaluation time (sum of every final eval) and size."""
    out: dict = {}
    train_s = max(r["train_time_ms"] for r in results) / 1000
    out.update(train_seconds_max=round(train_s, 3), train_under_600s=train_s <= LIMIT_SECONDS)
    if all("eval_seconds" in r for r in results):
        eval_s = max(r["eval_seconds"] for r in results)
        out.update(eval_seconds_max=eval_s, eval_under_600s=eval_s <= LIMIT_SECONDS)
    if all("artifact_bytes" in r for r in results):
        out["artifact_under_16mb"] = max(r["artifact_bytes"] for r in results) <= BUDGET_BYTES
    return out


def measured(counted: list[Run], superseded: list[tuple[Run, Run]], metric: str, folder: Path,
             code_bytes: int) -> dict:
    results = {str(r.seed): seed_result(r, metric, folder, code_bytes) for r in counted}
    losses = [r["val_loss"] for r in results.values()]
    bpbs = [r["val_bpb"] for r in results.values()]
    out: dict = dict(date=folder.name[:10], val_loss=round(statistics.fmean(losses), 8),
                     val_bpb=round(statistics.fmean(bpbs), 8))
    if all("artifact_bytes" in r for r in results.values()):
        out["bytes_total"] = max(r["artifact_bytes"] for r in results.values())  # every seed must fit
    out.update(bytes_code=code_bytes, headline_metric=metric)
    if len(counted) > 1:
        out.update(val_loss_std=round(statistics.stdev(losses), 8), val_bpb_std=round(statistics.stdev(bpbs), 8))
    out.update(seeds=[r.seed for r in counted], seed_results=results,
               superseded_runs=[dict(seed=old.seed, run_id=old.run_id, log=old.log.name, superseded_by=new.log.name)
                                for old, new in superseded],
               hardware=", ".join(sorted({r.hardware for r in counted})),
               pytorch_version=", ".join(sorted({r.torch_version for r in counted})),
               compliance=compliance(list(results.values())))
    return out


def merge_submission(existing: dict, template: dict, measurement: dict) -> dict:
    """Measured keys are recomputed; template keys win over the folder's copy; keys only the folder has are kept."""
    merged = {**{k: v for k, v in existing.items() if k not in MEASURED_KEYS}, **template, **measurement}
    return {**{k: merged[k] for k in (*LAUNCH_KEYS, "track") if k in merged}, **merged}


def reproduce_env(config: dict, module) -> list[str]:
    """The env vars that rebuild `config`: the preset leaving the fewest knobs to set, then those knobs."""
    best: list[str] | None = None
    for preset, values in module.PRESETS.items():
        base = dataclasses.asdict(module.Config(**values))
        knobs = sorted((k, v) for k, v in config.items() if k not in PER_RUN_KEYS and base.get(k) != v)
        env = ([f"PRESET={preset}"] if values else []) + [f"{k.upper()}={env_value(v)}" for k, v in knobs]
        if best is None or len(env) < len(best):
            best = env
    return best or []


def env_value(value: object) -> str:
    return str(int(value)) if isinstance(value, bool) else shlex.quote(str(value))


# --- README.md ---


def md(text: object) -> str:
    """Entrant text in markdown: angle-bracket placeholders would otherwise vanish as HTML tags."""
    return str(text).replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def metric_columns(counted: list[Run]) -> list[str]:
    present = {name for r in counted for name in r.exact}
    known = [m for m in reversed(significance.METRIC_PRIORITY) if m in present]
    return known + sorted(present - set(known))


def results_table(sub: dict, counted: list[Run]) -> list[str]:
    results = sub["seed_results"]
    metrics = metric_columns(counted)
    columns = [("steps", lambda r: r["steps"], "{:d}"), ("train s", lambda r: r["train_time_ms"] / 1000, "{:.1f}"),
               ("eval s", lambda r: r.get("eval_seconds"), "{:.1f}")]
    columns += [(f"{m} val_bpb", lambda r, m=m: r.get(m, {}).get("val_bpb"), "{:.5f}") for m in metrics]
    columns.append((f"{sub['headline_metric']} val_loss", lambda r: r["val_loss"], "{:.5f}"))
    if any("quant_penalty_bpb" in r for r in results.values()):
        columns.append(("quant penalty bpb", lambda r: r.get("quant_penalty_bpb"), "{:.5f}"))
    if any("artifact_bytes" in r for r in results.values()):
        columns.append(("artifact bytes", lambda r: r.get("artifact_bytes"), "{:,d}"))
    rows = ["| seed | run_id | " + " | ".join(c[0] for c in columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for seed, r in results.items():
        cells = ["" if get(r) is None else fmt.format(get(r)) for _, get, fmt in columns]
        rows.append(f"| {seed} | {md(r['run_id'])} | " + " | ".join(cells) + " |")
    if len(results) > 1:
        rows.append("| mean ± std | | " + " | ".join(mean_std([get(r) for r in results.values()], fmt)
                                                     for _, get, fmt in columns) + " |")
    return rows


def mean_std(values: list, fmt: str) -> str:
    if any(v is None for v in values) or fmt == "{:d}":
        return ""
    fmt = fmt.replace(",d", ",.0f")
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.format(statistics.stdev(values))}"


def readme_block(sub: dict, counted: list[Run], superseded: list[tuple[Run, Run]], module, folder: Path,
                 curve: str) -> str:
    newest = max(counted, key=lambda r: (r.started, r.log.name))
    spread = f" ± {sub['val_bpb_std']:.8f} (std over seeds)" if "val_bpb_std" in sub else ""
    env = " ".join(["SEED=$seed", *reproduce_env(newest.config, module)])
    world = int(newest.hardware.split("x", 1)[0])
    seeds = " ".join(str(s) for s in sub["seeds"])
    path = f"records/{folder.parent.name}/{folder.name}"
    lines = [f"# {md(sub['name'])}", "", md(sub.get("blurb", "")), "",
             f"Author: {md(sub.get('author', ''))} (GitHub {md(sub.get('github_id', ''))}) · track: "
             f"{track_folder(sub)} · date: {sub['date']} · {md(sub['hardware'])} · PyTorch {sub['pytorch_version']}",
             "", f"**val_bpb {sub['val_bpb']:.8f}**{spread}, val_loss {sub['val_loss']:.8f} nats: "
             f"`{sub['headline_metric']}`, mean over {len(counted)} seed(s): {seeds}.", "",
             *([] if sub["compliance"]["challenge_submission"] else [
                 f"**Not a challenge submission** (val_split: {sub['compliance']['val_split']}; see compliance in "
                 "submission.json): a challenge score needs the full FineWeb val split, no VAL_MAX_TOKENS, and the "
                 "budget.", ""]),
             "## Results", "",
             "One row per seed: the newest run of that seed (latest start). Train s is the training clock (paused "
             "during validation); eval s is the sum of the final evals.", "", *results_table(sub, counted), "",
             f"train_gpt.py is {sub['bytes_code']:,} bytes (the file in this folder)."
             + (f" It is packed; {pack_script.READABLE} is its readable source (not counted, same line numbers)."
                if (folder / pack_script.READABLE).is_file() else "")
             + (f" Largest artifact (code + compressed model): {sub['bytes_total']:,} of {BUDGET_BYTES:,} bytes."
                if "bytes_total" in sub else " No artifact is logged yet, so no total size."), ""]
    if (folder / "train_curve.png").is_file():
        stale = "" if curve == "train_curve.png" else f" (not redrawn for the latest run: {curve})"
        lines += [f"![train loss and val_bpb by step and training time](train_curve.png){stale}", ""]
    elif curve != "train_curve.png":
        lines += [f"No train_curve.png: {curve}.", ""]
    lines += [f"## Configuration (run {md(newest.run_id)})", "", "```json",
              json.dumps(newest.config, indent=1, sort_keys=True), "```", "",
              "## Reproduce", "",
              "From a directory whose paths match the config's data_path and tokenizer_path (e.g. the repository "
              "root with the data downloaded or built; see its README):", "", "```bash",
              "pip install -r requirements.txt",
              f"for seed in {seeds}; do {env} torchrun --standalone --nproc_per_node={world} train_gpt.py; done",
              "```", "", "## Significance", "",
              "Against the current record (from the repository root; the folder's newest log per seed counts):", "",
              "```bash", f"python3 records/significance.py {path} --metric {sub['headline_metric']} "
              "--baseline-bpb <record val_bpb>", "```", ""]
    if superseded:
        lines += ["## Superseded runs", "", "Kept for the record, not counted (a newer run of the same seed is):", ""]
        lines += [f"- seed {old.seed}: {old.log.name} (run {md(old.run_id)}) superseded by {new.log.name}"
                  for old, new in superseded]
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def write_readme(path: Path, block: str) -> None:
    generated = f"{README_BEGIN}\n{block}\n{README_END}"
    if not path.exists():
        text = generated + "\n\n## Details\n\n_Explain the submission here: what it changes and why it helps._\n"
    else:
        old = path.read_text(encoding="utf-8")
        if README_BEGIN not in old or README_END not in old:
            note(f"{path} has no generated block (its markers were removed); left as it is")
            return
        text = old[:old.index(README_BEGIN)] + generated + old[old.index(README_END) + len(README_END):]
    write_atomic(path, text.encode("utf-8"))


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- train_curve.png ---


def seconds_at(run: Run) -> Callable[[float], float]:
    """Training seconds at a step, interpolated between logged steps (depth switches log only their step)."""
    known = sorted({0: 0.0, **{s: ms for s, (_, ms) in run.train_points.items()},
                    **{s: ms for s, (_, ms) in run.val_points.items()}}.items())

    def at(step: float) -> float:
        for (s0, m0), (s1, m1) in zip(known, known[1:]):
            if s0 <= step <= s1:
                return (m0 + (m1 - m0) * (step - s0) / max(s1 - s0, 1)) / 1000
        return known[-1][1] / 1000
    return at


def draw_curve(counted: list[Run], metric: str, path: Path, title: str) -> str:
    """train_curve.png, or why not: train loss (top) and val_bpb (bottom) against step (left) and time (right)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display on a training box
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError:
        return "skipped reason:matplotlib not installed"
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), sharex="col", layout="constrained")
    labelled: set[tuple[int, float, int]] = set()  # one "×R" label per place: seeds often switch at the same step
    for i, run in enumerate(counted):
        color, to_s = f"C{i % 10}", seconds_at(run)
        for col, x in enumerate((lambda s: s, to_s)):
            top, bottom = axes[0][col], axes[1][col]
            train, val = sorted(run.train_points.items()), sorted(run.val_points.items())
            top.plot([x(s) for s, _ in train], [v for _, (v, _) in train], color=color, lw=1.2,
                     label=f"seed {run.seed} ({run.run_id})")
            bottom.plot([x(s) for s, _ in val], [v for _, (v, _) in val], "o-", color=color, ms=3, lw=1.2)
            bottom.plot([x(run.steps)], [run.exact[metric][1]], "*", color=color, ms=13)
            for step, repeats in run.depth_switches:
                for ax in (top, bottom):
                    ax.axvline(x(step), color=color, ls=":", lw=1)
                if (col, round(x(step), 3), repeats) not in labelled:
                    labelled.add((col, round(x(step), 3), repeats))
                    top.text(x(step), 0.98, f" ×{repeats}", color=color, fontsize=8, va="top",
                             transform=top.get_xaxis_transform())
            if run.swa_start is not None:
                for ax in (top, bottom):
                    ax.axvspan(x(run.swa_start), x(run.steps), color=color, alpha=0.12, lw=0)
    axes[0][0].set_ylabel("train loss (nats)")
    axes[1][0].set_ylabel("val_bpb")
    axes[1][0].set_xlabel("step")
    axes[1][1].set_xlabel("training time (s; the clock pauses during validation)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    handles = axes[0][0].get_legend_handles_labels()[0] + [
        Line2D([], [], color="gray", ls=":", label="depth switch (×repeats after it)"),
        Patch(color="gray", alpha=0.25, label="SWA window"),
        Line2D([], [], color="gray", marker="*", ls="", ms=11, label=f"{metric} (final)")]
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=min(len(handles), 6))
    fig.suptitle(title)
    fig.savefig(path.with_name(path.name + ".tmp.png"), dpi=110)
    plt.close(fig)
    os.replace(path.with_name(path.name + ".tmp.png"), path)
    return path.name


# --- the whole job ---


def make_record(log: Path, script: Path, template_path: Path, records_root: Path, headline: str | None) -> str:
    """Write or extend the run's records folder; returns the summary line."""
    if not log.is_file() or not script.is_file():
        raise RecordError(f"no such file: {log if not log.is_file() else script}")
    source, code = script.read_text(encoding="utf-8"), script.read_bytes()
    run = parse_log(log, source)
    template, module = load_template(template_path), load_script(script)
    why = not_a_submission(run, template, module)
    base = sanitize(template["name"]) + (f"_{why}" if why else "")
    folder = choose_folder(records_root / (NOT_A_SUBMISSION if why else track_folder(template)), base, run, code,
                           source)
    folder.mkdir(parents=True, exist_ok=True)
    copy_new(script, folder / "train_gpt.py")
    readable = pack_script.readable_source(script, note)
    if readable is not None and not (folder / pack_script.READABLE).exists():
        (folder / pack_script.READABLE).write_bytes(readable)
    if (script.parent / "requirements.txt").is_file():
        copy_new(script.parent / "requirements.txt", folder / "requirements.txt")
    log_name, new = add_log(folder, log, run, source)

    counted, superseded = newest_per_seed(folder_runs(folder, source))
    sub_path = folder / "submission.json"
    existing = json.loads(sub_path.read_text(encoding="utf-8")) if sub_path.is_file() else {}
    pinned = headline or {**existing, **template}.get("headline_metric_override")
    metric = choose_headline(counted, pinned)
    measurement = measured(counted, superseded, metric, folder, len(code))
    measurement["compliance"].update(val_split=", ".join(sorted({val_split(r, module) for r in counted})),
                                     challenge_submission=not any(not_a_submission(r, template, module)
                                                                  for r in counted))
    sub = merge_submission(existing, template, measurement)
    if headline:
        sub["headline_metric_override"] = headline
    write_atomic(sub_path, (json.dumps(sub, indent=2) + "\n").encode("utf-8"))
    title = f"{sub['name']}: {metric} val_bpb {sub['val_bpb']:.5f} (mean of {len(counted)} seed(s))"
    curve = draw_curve(counted, metric, folder / "train_curve.png", title)
    write_readme(folder / "README.md", readme_block(sub, counted, superseded, module, folder, curve))
    return (f"record:written path:{folder} log:{log_name} new:{int(new)} seeds:{len(counted)} "
            f"superseded:{len(superseded)} headline:{metric} val_bpb:{sub['val_bpb']:.8f} curve:{curve}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--log", required=True, type=Path, help="the run's log, logs/<RUN_ID>.txt")
    ap.add_argument("--script", default=Path("train_gpt.py"), type=Path, help="the train_gpt.py that ran")
    ap.add_argument("--template", type=Path, help="submission template (default: submission.json beside --script)")
    ap.add_argument("--records-root", default=Path("records"), type=Path)
    ap.add_argument("--headline", help="metric to report, e.g. final_sliding_window (pinned for later runs)")
    args = ap.parse_args(argv)
    try:
        line = make_record(args.log, args.script, args.template or args.script.parent / "submission.json",
                           args.records_root, args.headline)
    except (RecordError, OSError, ValueError) as err:
        print(f"record:skipped reason:{err}")
        return 2
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
