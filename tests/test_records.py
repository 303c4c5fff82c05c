"""records/make_record.py: the records folder a run writes (real tiny runs through the train_gpt.py hook) and its
rules on synthetic logs (template merge, headline, multi-seed mean/std, repeated seeds, no overwrite, refusals)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from test_main import tiny_env

sys.path.insert(0, str(REPO / "records"))
import make_record  # noqa: E402

import train_gpt  # noqa: E402

TRACK = "track_non_record_16mb"
TEMPLATE = dict(author="Ada Lovelace", github_id="ada", name="Tiny Recurrent (test)", blurb="A test.",
                track=TRACK, technique_summary="3x4 recurrence")
FOLDER_NAME = "Tiny_Recurrent_test"
DERIVED = ("submission.json", "README.md", "train_curve.png")  # regenerated from all logs; everything else is kept


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- real runs through the hook ---


@pytest.fixture
def workspace(tmp_path) -> Path:
    """A checkout in miniature: the script, the tools, requirements and a filled-in template."""
    for name in ("train_gpt.py", "requirements.txt"):
        shutil.copyfile(REPO / name, tmp_path / name)
    (tmp_path / "records").mkdir()
    for name in ("make_record.py", "significance.py", "pack_script.py"):
        shutil.copyfile(REPO / "records" / name, tmp_path / "records" / name)
    (tmp_path / "submission.json").write_text(json.dumps(TEMPLATE))
    return tmp_path


def train(cwd: Path, script: Path, env: dict) -> str:
    out = subprocess.run([sys.executable, str(script)], env=env, cwd=cwd, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_runs_write_one_folder_seeds_accumulate_and_nothing_is_overwritten(workspace, demo_subset, capsys):
    # Seed 1 through the hook: the folder, with the exact script, the log and the measured submission.json.
    out = train(workspace, workspace / "train_gpt.py", tiny_env(demo_subset, SEED="1", RUN_ID="a", RECORD="1"))
    line = re.search(r"^record:written path:(\S+) .*$", out, re.M)
    assert line, out[-2000:]
    folder = workspace / line.group(1)
    # A tiny run on a capped custom corpus is recorded, but as what it is: not a challenge submission.
    assert folder.parent == workspace / "records" / "not_a_submission" and re.fullmatch(
        rf"\d{{4}}-\d\d-\d\d_{FOLDER_NAME}_capped", folder.name)
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "requirements.txt", "submission.json", "train_curve.png", "train_gpt.py", "train_seed1.jsonl",
        "train_seed1.log", "train_seed1.ptz"]
    assert (folder / "train_gpt.py").read_bytes() == (workspace / "train_gpt.py").read_bytes()
    assert (folder / "requirements.txt").read_bytes() == (REPO / "requirements.txt").read_bytes()
    log = (workspace / "logs" / "a.txt").read_text()
    copied = (folder / "train_seed1.log").read_text()
    assert log.startswith(copied) and log[len(copied):] == line.group(0) + "\n"  # only the hook's own line is newer
    sub = json.loads((folder / "submission.json").read_text())
    final = re.search(r"^final_mixer_exact val_loss:(\S+) val_bpb:(\S+)$", log, re.M)  # the headline eval
    assert {k: sub[k] for k in TEMPLATE} == TEMPLATE
    assert (sub["val_loss"], sub["val_bpb"]) == (float(final.group(1)), float(final.group(2)))
    assert sub["seeds"] == [1] and sub["headline_metric"] == "final_mixer" and "val_bpb_std" not in sub
    code_bytes = len((workspace / "train_gpt.py").read_bytes())
    model_bytes = (folder / "train_seed1.ptz").stat().st_size
    assert sub["bytes_code"] == code_bytes and sub["bytes_total"] == code_bytes + model_bytes
    assert sub["hardware"].startswith("1xcpu") and sub["pytorch_version"] == train_gpt.torch.__version__
    assert sub["seed_results"]["1"]["steps"] == 12 and sub["compliance"]["train_under_600s"] is True
    assert sub["compliance"]["val_split"] == "capped" and sub["compliance"]["challenge_submission"] is False
    assert "**Not a challenge submission** (val_split: capped;" in (folder / "README.md").read_text()
    first = snapshot(folder)

    # RECORD=0: the run writes nothing anywhere under records/.
    before = snapshot(workspace / "records")
    out = train(workspace, workspace / "train_gpt.py", tiny_env(demo_subset, SEED="2", RUN_ID="b", RECORD="0"))
    assert "record:" not in out and snapshot(workspace / "records") == before
    # ... and recording it afterwards with the CLI adds a second row; the earlier files keep their bytes.
    assert make_record.main(["--log", str(workspace / "logs" / "b.txt"), "--script",
                             str(workspace / "train_gpt.py"), "--records-root", str(workspace / "records")]) == 0
    assert capsys.readouterr().out.startswith(f"record:written path:{folder} log:train_seed2.log new:1 seeds:2 ")
    second = snapshot(folder)
    assert all(second[name] == data for name, data in first.items() if name not in DERIVED)
    sub = json.loads((folder / "submission.json").read_text())
    bpbs = [sub["seed_results"][s]["val_bpb"] for s in ("1", "2")]
    assert sub["seeds"] == [1, 2] and sub["val_bpb"] == pytest.approx(statistics.fmean(bpbs), abs=1e-8)
    assert sub["val_bpb_std"] == pytest.approx(statistics.stdev(bpbs), abs=1e-8)

    # The copy inside the folder runs there; without a tool beside it, its hook skips. Recording that run (seed 1
    # again) keeps the first seed-1 log and counts the newer one.
    out = train(folder, folder / "train_gpt.py", tiny_env(demo_subset, SEED="1", RUN_ID="c", RECORD="1"))
    assert "record:skipped reason:no records/make_record.py next to train_gpt.py" in out
    assert make_record.main(["--log", str(folder / "logs" / "c.txt"), "--script", str(folder / "train_gpt.py"),
                             "--template", str(workspace / "submission.json"),
                             "--records-root", str(workspace / "records")]) == 0
    assert "log:train_seed1_c.log new:1 seeds:2 superseded:1" in capsys.readouterr().out
    third = snapshot(folder)
    assert all(third[name] == data for name, data in second.items() if name not in DERIVED)
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["seed_results"]["1"]["run_id"] == "c" and sub["seed_results"]["1"]["log"] == "train_seed1_c.log"
    assert sub["superseded_runs"] == [dict(seed=1, run_id="a", log="train_seed1.log",
                                           superseded_by="train_seed1_c.log")]
    readme = (folder / "README.md").read_text()
    assert "- seed 1: train_seed1.log (run a) superseded by train_seed1_c.log" in readme
    assert re.search(r"^\| 1 \| c \| 12 \| ", readme, re.M) and re.search(r"^\| 2 \| b \| 12 \| ", readme, re.M)

    # Recording a log that is already there changes nothing.
    assert make_record.main(["--log", str(workspace / "logs" / "a.txt"), "--script",
                             str(workspace / "train_gpt.py"), "--records-root", str(workspace / "records")]) == 0
    assert "log:train_seed1.log new:0 " in capsys.readouterr().out
    assert snapshot(folder) == third


# --- the rules, on synthetic logs of the real script ---

SOURCE = (REPO / "train_gpt.py").read_text(encoding="utf-8")
CODE_BYTES = len((REPO / "train_gpt.py").read_bytes())


def fake_log(logs: Path, run_id: str, seed: int, finals: dict[str, tuple[float, float]], *,
             started: str = "2026-11-20T10:00:00+0000", config: dict | None = None, artifact_bytes: int = 0,
             source: str = SOURCE, train_ms: float = 599_000.0) -> Path:
    """The log of a finished 8xH100 run: the script's source, then the console lines the run prints."""
    cfg = dataclasses.asdict(train_gpt.Config(**(config or {})))
    cfg.update(seed=seed, run_id=run_id)
    lines = ["python:3.12.0 torch:2.9.1+cu128", f"logs:logs/{run_id}.txt run_id:{run_id} started:{started}",
             "config:" + json.dumps(cfg, sort_keys=True), "model_params:23662344",
             "world_size:8 device:NVIDIA H100 80GB HBM3 grad_accum_steps:1 compile:1 autocast:1",
             f"train_shards:80 val_tokens:62021632 seed:{seed}",
             "val_split tokens:62022001 val_max_tokens:0",  # the challenge's sp1024 val split, in full
             "step:0/20000 val_loss:6.9300 val_bpb:4.1000 train_time:0ms step_avg:0.00ms",
             "step:1/20000 train_loss:6.9310 lr_scale:0.0200 repeats:2 train_time:150ms step_avg:150.00ms",
             "prog_depth:switch repeats:3 step:1200 frac:0.300",
             "step:2000/20000 train_loss:2.6000 lr_scale:1.0000 repeats:3 train_time:300000ms step_avg:150.00ms",
             "prog_depth:switch repeats:4 step:2000 frac:0.500", "swa:start step:3000",
             f"step:4000/20000 train_loss:2.1000 lr_scale:0.0100 repeats:4 train_time:{train_ms:.0f}ms step_avg:1ms",
             f"step:4000/20000 val_loss:2.0500 val_bpb:1.2100 train_time:{train_ms:.0f}ms step_avg:1ms",
             "swa:apply checkpoints:34", "weights_sha256:00"]
    for name, (loss, bpb) in finals.items():
        lines += [f"{name} val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:100000ms",
                  f"{name}_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}"]
    if artifact_bytes:
        (logs / f"{run_id}.ptz").write_bytes(b"\x01" * artifact_bytes)
        lines += ["quant_penalty_bpb:0.01230000",
                  f"artifact code_bytes:{CODE_BYTES} model_bytes:{artifact_bytes} total_bytes:"
                  f"{CODE_BYTES + artifact_bytes} budget_bytes:16000000 headroom_bytes:1",
                  f"artifact:written path:{logs / f'{run_id}.ptz'}"]
    path = logs / f"{run_id}.txt"
    path.write_text(source + "\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


# final_hedge_reference is lower than the mixer, yet never the headline (it is not a normalized distribution).
FINALS = {"final_float": (2.05, 1.214), "final_roundtrip": (2.06, 1.22), "final_sliding_window": (2.02, 1.196),
          "final_mixer": (2.0, 1.184), "final_hedge_reference": (1.9, 1.125)}


DRAW_CURVE = make_record.draw_curve


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """tmp_path as the working directory with logs/ and a template; the script is the repository's.

    The picture is drawn only where a test asks for it (DRAW_CURVE): drawing is most of a call's time.
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(make_record, "draw_curve", lambda *a: "skipped reason:not drawn in this test")
    (tmp_path / "logs").mkdir()
    (tmp_path / "submission.json").write_text(json.dumps(TEMPLATE))
    return tmp_path


def run_tool(capsys, repo: Path, log: Path, *extra: str, script: Path = REPO / "train_gpt.py") -> tuple[int, str]:
    """(exit code, the summary line on stdout)."""
    code = make_record.main(["--log", str(log), "--script", str(script), "--template",
                             str(repo / "submission.json"), *extra])
    return code, capsys.readouterr().out.strip()


def only_folder(repo: Path) -> Path:
    (folder,) = (repo / "records" / TRACK).iterdir()
    return folder


def submission(folder: Path) -> dict:
    return json.loads((folder / "submission.json").read_text())


def test_every_final_is_reported_and_the_mixer_is_the_headline(repo, capsys, monkeypatch):
    monkeypatch.setattr(make_record, "draw_curve", DRAW_CURVE)
    log = fake_log(repo / "logs", "r1", 1337, FINALS, artifact_bytes=15_000_000, train_ms=600_040.0)
    code, out = run_tool(capsys, repo, log)
    assert code == 0 and "headline:final_mixer val_bpb:1.18400000 curve:train_curve.png" in out
    folder = only_folder(repo)
    assert folder.name == f"2026-11-20_{FOLDER_NAME}"
    assert (folder / "train_seed1337.ptz").read_bytes() == (repo / "logs" / "r1.ptz").read_bytes()
    sub = submission(folder)
    result = sub["seed_results"]["1337"]
    assert (sub["val_loss"], sub["val_bpb"], sub["headline_metric"]) == (2.0, 1.184, "final_mixer")
    assert {name: (result[name]["val_loss"], result[name]["val_bpb"]) for name in FINALS} == FINALS
    assert result["quant_penalty_bpb"] == 0.0123 and result["eval_seconds"] == 500.0  # 5 final evals x 100 s
    assert result["model_bytes"] == 15_000_000 and result["artifact_bytes"] == CODE_BYTES + 15_000_000
    assert sub["bytes_total"] == CODE_BYTES + 15_000_000 and sub["bytes_code"] == CODE_BYTES
    assert sub["hardware"] == "8xNVIDIA H100 80GB HBM3" and sub["pytorch_version"] == "2.9.1+cu128"
    # 600.04 s is over 600 s: the flag says so rather than rounding it away.
    assert sub["compliance"] == dict(train_seconds_max=600.04, train_under_600s=False, eval_seconds_max=500.0,
                                     eval_under_600s=True, artifact_under_16mb=True, val_split="fineweb",
                                     challenge_submission=True)  # non-record track: no time limit
    assert list(sub)[:10] == ["author", "github_id", "name", "blurb", "date", "val_loss", "val_bpb", "bytes_total",
                              "bytes_code", "track"]


def test_headline_override_is_pinned_for_later_seeds(repo, capsys):
    run_tool(capsys, repo, fake_log(repo / "logs", "r1", 1, FINALS), "--headline", "final_sliding_window")
    code, out = run_tool(capsys, repo, fake_log(repo / "logs", "r2", 2, FINALS, started="2026-11-20T11:00:00+0000"))
    assert code == 0 and "headline:final_sliding_window val_bpb:1.19600000" in out
    sub = submission(only_folder(repo))
    assert sub["headline_metric_override"] == "final_sliding_window" and sub["val_loss"] == 2.02
    code, out = run_tool(capsys, repo, fake_log(repo / "logs", "r3", 3, FINALS), "--headline", "final_nothing")
    assert code == 2 and out.startswith("record:skipped reason:headline final_nothing is not in ")


def test_without_a_mixer_the_headline_falls_back_in_order(repo, capsys):
    finals = {k: FINALS[k] for k in ("final_float", "final_roundtrip")}
    code, out = run_tool(capsys, repo, fake_log(repo / "logs", "r1", 1, finals))
    assert code == 0 and "headline:final_roundtrip " in out


def test_mean_and_std_over_three_seeds(repo, capsys):
    values = {1: (2.00, 1.180), 2: (2.01, 1.186), 3: (2.03, 1.199)}
    for seed, pair in values.items():  # the third seed runs the next day: same folder (named by the first)
        started = f"2026-11-{20 + seed // 3}T23:00:00+0000"
        log = fake_log(repo / "logs", f"r{seed}", seed, {"final_mixer": pair}, started=started)
        assert run_tool(capsys, repo, log)[0] == 0
    sub = submission(only_folder(repo))
    losses, bpbs = zip(*values.values())
    assert sub["seeds"] == [1, 2, 3]
    assert sub["val_loss"] == round(statistics.fmean(losses), 8) and sub["val_bpb"] == round(statistics.fmean(bpbs), 8)
    assert sub["val_loss_std"] == round(statistics.stdev(losses), 8)
    assert sub["val_bpb_std"] == round(statistics.stdev(bpbs), 8)
    readme = (only_folder(repo) / "README.md").read_text()
    mean_row = next(line for line in readme.splitlines() if line.startswith("| mean ± std |"))
    assert f"| 599.0 ± 0.0 | 100.0 ± 0.0 | {statistics.fmean(bpbs):.5f} ± {statistics.stdev(bpbs):.5f} |" in mean_row
    assert "for seed in 1 2 3; do SEED=$seed torchrun --standalone --nproc_per_node=8 train_gpt.py; done" in readme
    assert (f"python3 records/significance.py records/{TRACK}/2026-11-20_{FOLDER_NAME} --metric final_mixer "
            "--baseline-bpb <record val_bpb>") in readme


def test_newest_run_of_a_seed_is_the_latest_start_not_the_latest_recorded(repo, capsys):
    later = fake_log(repo / "logs", "later", 7, {"final_mixer": (2.0, 1.18)}, started="2026-11-20T12:00:00+0000")
    earlier = fake_log(repo / "logs", "earlier", 7, {"final_mixer": (2.1, 1.25)}, started="2026-11-20T09:00:00+0000")
    run_tool(capsys, repo, later)
    code, out = run_tool(capsys, repo, earlier)
    folder = only_folder(repo)
    assert code == 0 and "log:train_seed7_earlier.log new:1 seeds:1 superseded:1" in out
    assert sorted(p.name for p in folder.glob("*.log")) == ["train_seed7.log", "train_seed7_earlier.log"]
    sub = submission(folder)
    assert sub["seed_results"]["7"]["run_id"] == "later" and sub["val_bpb"] == 1.18
    assert sub["superseded_runs"][0]["run_id"] == "earlier"


def test_a_reused_run_id_keeps_every_copy(repo, capsys):
    """RUN_ID reuse appends a second run to the same log: a new file, never a replacement."""
    log = fake_log(repo / "logs", "same", 1, {"final_mixer": (2.0, 1.18)})
    run_tool(capsys, repo, log)
    first = log.read_text()
    second = fake_log(repo / "logs", "same", 1, {"final_mixer": (2.2, 1.3)}, started="2026-11-20T11:00:00+0000")
    second.write_text(first + second.read_text())
    code, out = run_tool(capsys, repo, second)
    folder = only_folder(repo)
    assert code == 0 and "log:train_seed1_same.log new:1 " in out
    assert (folder / "train_seed1.log").read_text() == first
    assert submission(folder)["val_bpb"] == 1.3  # the appended (newer) run


def test_template_merge_rules(repo, capsys):
    run_tool(capsys, repo, fake_log(repo / "logs", "r1", 1, FINALS))
    folder = only_folder(repo)
    sub = submission(folder)
    assert {k: sub[k] for k in TEMPLATE} == TEMPLATE
    # The entrant edits the folder's copy and the template; a measured key in either is recomputed.
    (folder / "submission.json").write_text(json.dumps({**sub, "notes": "by hand", "author": "stale",
                                                        "val_bpb": 0.5}))
    (repo / "submission.json").write_text(json.dumps({**TEMPLATE, "author": "Ada L.", "val_loss": 0.1}))
    run_tool(capsys, repo, fake_log(repo / "logs", "r2", 2, FINALS))
    sub = submission(folder)
    assert sub["notes"] == "by hand" and sub["author"] == "Ada L." and sub["technique_summary"] == "3x4 recurrence"
    assert (sub["val_bpb"], sub["val_loss"]) == (1.184, 2.0)


def test_placeholders_are_reported_and_kept_visible(repo, capsys):
    log = fake_log(repo / "logs", "r1", 1, FINALS)
    # No --template: the one beside the script, i.e. the repository's submission.json with its placeholders.
    assert make_record.main(["--log", str(log), "--script", str(REPO / "train_gpt.py")]) == 0
    assert "record:note template fields still to fill in" in capsys.readouterr().err
    readme = (repo / "records" / TRACK / "2026-11-20_DepthRecurrentGPT" / "README.md").read_text()
    assert "&lt;your name&gt;" in readme  # not swallowed as an HTML tag


def test_other_code_or_configuration_gets_its_own_folder(repo, capsys):
    run_tool(capsys, repo, fake_log(repo / "logs", "r1", 1, FINALS))
    run_tool(capsys, repo, fake_log(repo / "logs", "r2", 2, FINALS, config=dict(model_dim=768)))
    edited = repo / "edited" / "train_gpt.py"
    edited.parent.mkdir()
    edited.write_text(SOURCE + "# edited\n", encoding="utf-8")
    code, out = run_tool(capsys, repo, fake_log(repo / "logs", "r3", 3, FINALS, source=SOURCE + "# edited\n"),
                         script=edited)
    assert code == 0
    folders = sorted(p.name for p in (repo / "records" / TRACK).iterdir())
    assert folders == [f"2026-11-20_{FOLDER_NAME}", f"2026-11-20_{FOLDER_NAME}_2", f"2026-11-20_{FOLDER_NAME}_3"]
    assert [submission(repo / "records" / TRACK / f)["seeds"] for f in folders] == [[1], [2], [3]]
    assert (repo / "records" / TRACK / folders[2] / "train_gpt.py").read_bytes() == edited.read_bytes()


def test_demo_runs_are_named_apart_and_reproduce_with_the_preset(repo, capsys):
    log = fake_log(repo / "logs", "d1", 1337, FINALS, config=dict(train_gpt.PRESETS["demo"]))
    assert run_tool(capsys, repo, log)[0] == 0
    (folder,) = (repo / "records" / "not_a_submission").iterdir()
    assert folder.name == f"2026-11-20_{FOLDER_NAME}_demo" and not (repo / "records" / TRACK).exists()
    readme = (folder / "README.md").read_text()
    assert "do SEED=$seed PRESET=demo torchrun --standalone --nproc_per_node=8 train_gpt.py; done" in readme
    log = fake_log(repo / "logs", "d2", 1, FINALS, config=dict(train_gpt.PRESETS["demo"], model_dim=64, compile="1"))
    assert run_tool(capsys, repo, log)[0] == 0
    readme = (repo / "records" / "not_a_submission" / f"2026-11-20_{FOLDER_NAME}_demo_2" / "README.md").read_text()
    assert "do SEED=$seed PRESET=demo COMPILE=1 MODEL_DIM=64 torchrun" in readme


@pytest.mark.parametrize("case, why", [
    ("fineweb", ""), ("capped", "capped"), ("custom_count", "custom"), ("no_val_split_line", "custom"),
    ("demo_preset_elsewhere", "capped"), ("over_size", "over_budget"), ("over_time_10min", "over_budget")])
def test_only_the_full_fineweb_val_split_within_budget_is_a_submission(repo, capsys, case, why):
    """The challenge's data is recognised by content (no cap, its val token count), never by a folder name."""
    config = dict(capped=dict(val_max_tokens=65536),
                  demo_preset_elsewhere=dict(train_gpt.PRESETS["demo"], data_path="./data/datasets/mail_sp1024",
                                             tokenizer_path="./data/tokenizers/mail_1024_bpe.model")).get(case)
    log = fake_log(repo / "logs", "r1", 1, FINALS, config=config, artifact_bytes=16_000_000 if case == "over_size"
                   else 1000, train_ms=600_500.0 if case == "over_time_10min" else 599_000.0)
    text = log.read_text()
    if case == "custom_count":
        text = text.replace("val_split tokens:62022001 ", "val_split tokens:61000000 ")
    elif case == "no_val_split_line":  # a log of an older script: its data cannot be told apart, so not a submission
        text = text.replace("val_split tokens:62022001 val_max_tokens:0\n", "")
    log.write_text(text)
    if case == "over_time_10min":
        (repo / "submission.json").write_text(json.dumps({**TEMPLATE, "track": "track_10min_16mb"}))
    assert run_tool(capsys, repo, log)[0] == 0
    (folder,) = (repo / "records").glob("*/*")
    sub = submission(folder)
    assert sub["compliance"]["challenge_submission"] is (why == "")
    assert sub["compliance"]["val_split"] == ("fineweb" if why in ("", "over_budget") else why)
    if why:
        assert folder.parent.name == "not_a_submission" and folder.name == f"2026-11-20_{FOLDER_NAME}_{why}"
        assert "**Not a challenge submission**" in (folder / "README.md").read_text()
    else:
        assert folder.parent.name == TRACK and folder.name == f"2026-11-20_{FOLDER_NAME}"


@pytest.mark.parametrize("case", ["other_script", "unfinished", "bad_track", "no_template"])
def test_refusals_write_nothing(repo, capsys, case):
    log = fake_log(repo / "logs", "r1", 1, FINALS, source=SOURCE + "# other\n" if case == "other_script" else SOURCE)
    if case == "unfinished":
        log.write_text(re.sub(r"^final_.*\n", "", log.read_text(), flags=re.M))
    if case == "bad_track":
        (repo / "submission.json").write_text(json.dumps({**TEMPLATE, "track": "10min"}))
    if case == "no_template":
        (repo / "submission.json").unlink()
    code, out = run_tool(capsys, repo, log)
    assert code == 2 and out.startswith("record:skipped reason:") and "\n" not in out
    assert not (repo / "records").exists()


def test_without_matplotlib_the_record_is_written_without_a_picture(repo, capsys, monkeypatch):
    monkeypatch.setattr(make_record, "draw_curve", DRAW_CURVE)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    code, out = run_tool(capsys, repo, fake_log(repo / "logs", "r1", 1, FINALS))
    folder = only_folder(repo)
    assert code == 0 and out.endswith("curve:skipped reason:matplotlib not installed")
    assert not (folder / "train_curve.png").exists()
    assert "No train_curve.png: skipped reason:matplotlib not installed." in (folder / "README.md").read_text()


def test_readme_keeps_the_entrants_text_outside_the_markers(repo, capsys):
    run_tool(capsys, repo, fake_log(repo / "logs", "r1", 1, FINALS))
    readme = only_folder(repo) / "README.md"
    readme.write_text("Intro by hand.\n" + readme.read_text().replace("_Explain the submission here", "We did X"))
    run_tool(capsys, repo, fake_log(repo / "logs", "r2", 2, FINALS))
    text = readme.read_text()
    assert text.startswith("Intro by hand.\n" + make_record.README_BEGIN) and "We did X" in text
    assert re.search(r"^\| 2 \| r2 \| 4000 \| ", text, re.M)


def test_a_resumed_log_is_one_run_with_the_whole_curve(repo):
    log = fake_log(repo / "logs", "res", 1, FINALS)
    blocks = log.read_text().split(SOURCE + "\n")[1]
    cut = blocks.split("step:2000/20000 train_loss")[0] + "stopped: signal step:1500 (continue with RESUME=auto)\n"
    log.write_text(SOURCE + "\n" + cut + SOURCE + "\n" + blocks.replace(
        "started:2026-11-20T10:00:00+0000", "started:2026-11-21T08:00:00+0000").replace(
        "step:1/20000 train_loss:6.9310", "step:1600/20000 train_loss:3.0000"))
    run = make_record.parse_log(log, SOURCE)
    assert run.date == "2026-11-20" and sorted(run.train_points) == [1, 1600, 2000, 4000]
    assert run.train_points[1][0] == 6.931 and run.steps == 4000 and run.exact["final_mixer"] == (2.0, 1.184)
