"""Every bad input a user can give ends in one line naming the problem and the fix, exit code 2, nothing written:
the table below (input -> the line's key phrase), run through main() in-process for the problems found before any
work, and through real subprocesses (one process and 2-rank torchrun) for the ones found after the runtime starts."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, tiny_config
from test_main import tiny_env

import train_gpt

SCRIPT = str(REPO / "train_gpt.py")


class Crafted:
    """A pickle that would run a shell command when loaded without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_shard(path: Path, tokens, magic: int = train_gpt.SHARD_MAGIC, version: int = 1, extra: bytes = b""):
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens)
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes() + extra)


def copy_data(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def setup_case(case: str, root: Path, subset: dict) -> dict[str, str]:
    """Build the bad input of `case` under root/in and return the env updates that point the run at it."""
    inp = root / "in"
    inp.mkdir()
    data = lambda: copy_data(subset["data_path"], inp / "data")  # noqa: E731
    val0, train0 = "fineweb_val_000000.bin", "fineweb_train_000000.bin"
    if case == "device_cuda":
        return dict(DEVICE="cuda")
    if case == "device_cuda_n":
        return dict(DEVICE="cuda:1")
    if case == "data_path_missing":
        return dict(DATA_PATH=str(inp / "nowhere"))
    if case == "data_path_is_a_file":
        (inp / "file").write_text("x")
        return dict(DATA_PATH=str(inp / "file"))
    if case == "empty_shard_folder":
        (inp / "empty").mkdir()
        return dict(DATA_PATH=str(inp / "empty"))
    if case == "no_train_shards":
        d = data()
        (d / train0).unlink()
        return dict(DATA_PATH=str(d))
    if case in ("val_truncated_100_bytes", "val_extra_bytes", "val_bad_magic", "train_bad_magic",
                "train_bad_version", "train_shorter_than_header"):
        d = data()
        shard = d / (val0 if case.startswith("val") else train0)
        blob = shard.read_bytes()
        if case == "val_truncated_100_bytes":
            shard.write_bytes(blob[:-100])
        elif case == "val_extra_bytes":
            shard.write_bytes(blob + b"\0\0")
        elif case == "train_shorter_than_header":
            shard.write_bytes(blob[:10])
        else:
            header = np.frombuffer(blob[:1024], dtype="<i4").copy()
            header[0 if "magic" in case else 1] = 7
            shard.write_bytes(header.tobytes() + blob[1024:])
        return dict(DATA_PATH=str(d))
    if case == "val_split_too_short":
        d = data()
        write_shard(d / val0, [1] * 20)  # 20 tokens, TRAIN_SEQ_LEN=32
        return dict(DATA_PATH=str(d))
    if case == "val_max_tokens_below_seq_len":
        return dict(VAL_MAX_TOKENS="16")
    if case == "tokenizer_missing":
        return dict(TOKENIZER_PATH=str(inp / "none.model"))
    if case == "tokenizer_garbage":
        (inp / "bad.model").write_bytes(os.urandom(200))
        return dict(TOKENIZER_PATH=str(inp / "bad.model"))
    if case == "tokenizer_is_a_folder":
        (inp / "dir.model").mkdir()
        return dict(TOKENIZER_PATH=str(inp / "dir.model"))
    if case == "tokenizer_vocab_differs":
        return dict(VOCAB_SIZE="1024")
    if case.startswith("resume_"):
        path = inp / "ckpt"
        if case == "resume_garbage":
            path.write_bytes(os.urandom(300))
        elif case == "resume_crafted_zip":
            torch.save({"config": "{}", "model": Crafted(root / "PWNED")}, path)
        elif case == "resume_raw_pickle":
            path.write_bytes(pickle.dumps(Crafted(root / "PWNED")))
        elif case == "resume_folder":
            path.mkdir()
        elif case == "resume_tensor_dict":
            torch.save({"weight": torch.zeros(3)}, path)
        elif case in ("resume_truncated_zip", "resume_other_config"):
            cfg = train_gpt.Config.from_env(tiny_env(subset, MODEL_DIM="64" if "other" in case else "32"))
            payload = dict.fromkeys(train_gpt.CHECKPOINT_KEYS, None)
            payload.update(config=train_gpt.resume_key(cfg), model={"w": torch.zeros(1000)})
            torch.save(payload, path)
            if "truncated" in case:
                path.write_bytes(path.read_bytes()[:-400])
        elif case == "resume_auto_without_run_id":
            return dict(RESUME="auto", RUN_ID="")
        return dict(RESUME=str(path if case != "resume_missing" else inp / "gone.ckpt"))
    if case == "logs_is_a_file":
        (root / "run" / "logs").write_text("not a folder")
        return {}
    if case == "eval_only_missing":
        return dict(EVAL_ONLY=str(inp / "none.ptz"))
    if case == "run_id_with_a_slash":
        return dict(RUN_ID="../elsewhere")
    if case == "batch_does_not_split_over_3_ranks":
        return dict(RANK="0", WORLD_SIZE="3", LOCAL_RANK="0", LOCAL_WORLD_SIZE="3")
    raise AssertionError(case)


# input -> the key phrase of its one line (all `config_error: ...`, exit code 2, before any file is written)
CASES = {
    "device_cuda": "DEVICE=cuda but this torch",
    "device_cuda_n": "DEVICE=cuda:1 but this torch",
    "data_path_missing": "is not a folder; build or download a dataset",
    "data_path_is_a_file": "is not a folder; build or download a dataset",
    "empty_shard_folder": "has no fineweb_val_*.bin shards",
    "no_train_shards": "has no fineweb_train_*.bin shards",
    "val_truncated_100_bytes": "a truncated or damaged copy",
    "val_extra_bytes": "a truncated or damaged copy",
    "val_bad_magic": "fineweb_val_000000.bin is not a challenge shard",
    "train_bad_magic": "fineweb_train_000000.bin is not a challenge shard",
    "train_bad_version": "fineweb_train_000000.bin is not a challenge shard",
    "train_shorter_than_header": "fineweb_train_000000.bin is not a challenge shard",
    "val_split_too_short": "has 20 tokens, too few for TRAIN_SEQ_LEN=32",
    "val_max_tokens_below_seq_len": "VAL_MAX_TOKENS must be 0 (the whole split) or >= TRAIN_SEQ_LEN=32, got 16",
    "tokenizer_missing": "none.model: no such file",
    "tokenizer_garbage": "is not a SentencePiece model",
    "tokenizer_is_a_folder": "dir.model: no such file",
    "tokenizer_vocab_differs": "has 512 pieces, VOCAB_SIZE=1024: set VOCAB_SIZE=512",
    "resume_garbage": "is not a checkpoint of this script (not a torch.save zip)",
    "resume_crafted_zip": "holds objects that need code to load: refused unread, no code ran",
    "resume_raw_pickle": "is not a checkpoint of this script (not a torch.save zip)",
    "resume_missing": "no checkpoint at",
    "resume_folder": "no checkpoint at",
    "resume_tensor_dict": "is not a checkpoint of this script (other contents)",
    "resume_truncated_zip": "is damaged",
    "resume_other_config": "is a checkpoint of another configuration (differs in: model_dim)",
    "resume_auto_without_run_id": "RESUME=auto resumes logs/<RUN_ID>.ckpt: set the RUN_ID",
    "logs_is_a_file": "is not a folder; the run writes logs/<RUN_ID>.txt",
    "eval_only_missing": "EVAL_ONLY=",
    "run_id_with_a_slash": "RUN_ID names files in logs/",
    "batch_does_not_split_over_3_ranks": "does not split into world_size=3",
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_code_2(case, tmp_path, demo_subset, monkeypatch, capsys):
    (tmp_path / "run").mkdir()
    env = {**tiny_env(demo_subset), **setup_case(case, tmp_path, demo_subset)}
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    monkeypatch.chdir(tmp_path / "run")
    monkeypatch.setattr(os, "environ", env)
    with pytest.raises(SystemExit) as exit_info:
        train_gpt.main()  # every one of these stops before the runtime starts: a plain sys.exit(2)
    out = capsys.readouterr()
    assert exit_info.value.code == 2 and out.out == ""
    assert out.err.count("\n") == 1 and out.err.startswith("config_error: ") and CASES[case] in out.err, out.err
    assert "weights_only" not in out.err and "Traceback" not in out.err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before  # no logs/, nothing written
    assert not (tmp_path / "PWNED").exists()  # no crafted pickle ran


def test_a_rank_other_than_0_stays_silent_and_exits_2(tmp_path, demo_subset, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "environ", tiny_env(demo_subset, DATA_PATH=str(tmp_path / "nowhere"), RANK="1",
                                                WORLD_SIZE="2", LOCAL_RANK="1"))
    with pytest.raises(SystemExit) as exit_info:
        train_gpt.main()
    assert exit_info.value.code == 2 and capsys.readouterr() == ("", "")


def run(cmd: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=240)


def tiny_artifact(path: Path, vocab: int) -> Path:
    """A real artifact of a tiny model (rounded, no GPTQ), as a training run writes it."""
    cfg = tiny_config(vocab_size=vocab, quant_method="clip")
    model = train_gpt.GPT(cfg)
    stored, _ = train_gpt.quantize_model(cfg, model, {}, model.recurrent_matrices())
    path.write_bytes(train_gpt.pack_artifact(cfg, stored)[0])
    return path


def test_problems_found_after_start_up_are_one_line_too(tmp_path, demo_subset):
    """EVAL_ONLY learns VOCAB_SIZE from the artifact, and val token ids are read with the split: both come after
    the runtime starts, and still end in one line and exit code 2 on every rank."""
    env = tiny_env(demo_subset, EVAL_ONLY=str(tiny_artifact(tmp_path / "v600.ptz", 600)))
    for knob in ("VOCAB_SIZE", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "MLP_MULT"):
        env.pop(knob)
    (tmp_path / "garbage.ptz").write_bytes(os.urandom(500))
    torch.save({"x": Crafted(tmp_path / "PWNED")}, tmp_path / "crafted.ptz")
    other = copy_data(demo_subset["data_path"], tmp_path / "other")
    write_shard(other / "fineweb_val_000000.bin", [1, 5, 700, 3] * 40)  # id 700 >= VOCAB_SIZE=512
    cases = [(env, "config_error: TOKENIZER_PATH=", "has 512 pieces, VOCAB_SIZE=600"),
             ({**env, "EVAL_ONLY": str(tmp_path / "garbage.ptz")}, "artifact_error: ", "not a train_gpt artifact"),
             ({**env, "EVAL_ONLY": str(tmp_path / "crafted.ptz")}, "artifact_error: ", "a torch.save/pickle file"),
             (tiny_env(demo_subset, DATA_PATH=str(other)), "config_error: ", "hold token id 700 >= VOCAB_SIZE=512")]
    for case_env, prefix, phrase in cases:
        out = run([sys.executable, SCRIPT], case_env, tmp_path)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr[-2000:]
        assert out.stderr.startswith(prefix) and phrase in out.stderr and out.stdout == ""
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "logs" / "tiny.txt").exists()


def test_torchrun_prints_the_line_once_and_every_rank_exits_2(tmp_path, demo_subset):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT]
    out = run(cmd, tiny_env(demo_subset, DATA_PATH=str(tmp_path / "nowhere")), tmp_path)
    assert out.returncode == 1  # torchrun's own code for "a worker failed"
    assert out.stderr.count("config_error: ") == 1 and "is not a folder; build or download" in out.stderr
    # torchrun's report: the first rank to finish exited 2; torchrun then stops the others, so on a busy machine a
    # rank still starting up is listed with -15 (torchrun's SIGTERM) instead of its own 2.
    codes = re.findall(r"exitcode  : (-?\d+)", out.stderr)
    assert len(codes) == 2 and "2" in codes and set(codes) <= {"2", "-15"}, out.stderr[-3000:]
    assert not (tmp_path / "logs").exists()


# The job-script wrapper of README.md ("Stopping a run"): SIGTERM goes to the ranks, not to torchrun.
WRAPPER = """torchrun_cmd=("$@")
"${torchrun_cmd[@]}" & pid=$!
trap 'kill -TERM $(pgrep -P $pid)' TERM INT
while wait $pid; rc=$?; kill -0 $pid 2>/dev/null; do :; done
exit $rc
"""


@pytest.mark.parametrize("target", ["torchrun", "wrapper"])
def test_sigterm_exit_codes_a_job_script_sees(target, tmp_path, demo_subset):
    """SIGTERM to torchrun: every rank checkpoints and exits 0, yet torchrun exits 1 (its SignalException). The
    wrapper forwards the signal to the ranks only, so torchrun sees clean exits and the job ends with 0."""
    env = tiny_env(demo_subset, ITERATIONS="400", TRAIN_LOG_EVERY="1", VAL_LOSS_EVERY="0", RUN_ID="cut")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT]
    if target == "wrapper":
        (tmp_path / "job.sh").write_text(WRAPPER)
        cmd = ["bash", str(tmp_path / "job.sh"), *cmd]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step:3/400 train_loss"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=120)
    assert "stopped: signal step:" in rest and (tmp_path / "logs" / "cut.ckpt").is_file()
    if target == "torchrun":
        assert proc.returncode == 1 and "SignalException" in err
    else:
        assert proc.returncode == 0 and "SignalException" not in err, err[-3000:]
