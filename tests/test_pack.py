"""records/pack_script.py: the packed train_gpt.py is the same program (same log lines and weights on a real tiny
run, same DRY_RUN output, same names and line numbers on import) in at most 40,000 bytes, and the records folder of
a packed run holds the packed file as train_gpt.py and the readable source beside it."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tokenize
import traceback
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_config
from test_main import tiny_env

sys.path.insert(0, str(REPO / "records"))
import make_record  # noqa: E402
import pack_script  # noqa: E402

import train_gpt  # noqa: E402

SOURCE = (REPO / "train_gpt.py").read_text(encoding="utf-8")
PACKED = pack_script.pack(SOURCE)
TEMPLATE = dict(author="Ada Lovelace", github_id="ada", name="Packed (test)", blurb="A test.",
                track="track_non_record_16mb")


def write_packed(folder: Path, name: str = "train_gpt_packed.py") -> Path:
    path = folder / name
    path.write_bytes(PACKED.encode("utf-8"))
    return path


def test_the_packed_script_fits_the_issue_limit():
    size = len(PACKED.encode("utf-8"))
    assert size <= 40_000, size
    assert size < 0.3 * len(SOURCE.encode("utf-8"))  # today: about 34.0 KB for 135 KB of source (25 %)


def test_stripping_drops_comments_and_docstrings_and_keeps_every_line_number():
    stripped = pack_script.strip_source(SOURCE)
    assert stripped.count("\n") == SOURCE.count("\n")
    tokens = list(tokenize.generate_tokens(io.StringIO(stripped).readline))
    assert not [t for t in tokens if t.type == tokenize.COMMENT]
    tree = ast.parse(stripped)
    assert ast.get_docstring(tree) is None and not pack_script.docstrings(tree)
    defs = {n.name: n.lineno for n in ast.walk(ast.parse(SOURCE)) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert defs == {n.name: n.lineno for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    indents = [(n.name, n.col_offset) for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    assert indents == [(n.name, n.col_offset // 4) for n in ast.walk(ast.parse(SOURCE))
                       if isinstance(n, ast.FunctionDef)]  # one space per level
    assert len(stripped) < 0.8 * len(SOURCE)  # prose and indentation are ~30 % of the bytes
    assert pack_script.strip_source(stripped) == stripped


def test_stripping_keeps_string_values_and_refuses_what_it_cannot_keep():
    source = ('def f():\n    """Doc."""\n    return """a  # not a comment\n        kept  """  # gone\n\n\n'
              'class E(Exception):\n    """Only a docstring."""\n')
    stripped = pack_script.strip_source(source)
    assert stripped == 'def f():\n\n return """a  # not a comment\n        kept  """\n\n\nclass E(Exception):\n ...\n'
    with pytest.raises(pack_script.PackError, match="moved"):  # x = 1 would move up to the docstring's first line
        pack_script.strip_source('def f():\n    """Doc.\n    """; x = 1\n    return x\n')


TRICKY = r'''# -*- coding: utf-8 -*-
"""Module docstring: « non-ASCII » and a # that is no comment."""
import math  # a comment


class Only:
    """Just a docstring."""


class Point:
    """Two lines
    of docstring."""
    x: int = 1  # kept annotation, dropped comment

    def norm(self, scale=2): """Docstring on the def line."""; return math.hypot(self.x, scale)


def table(width=3):
    """Doc."""
    rows = [f"{i:>{width}}|" for i in range(3)]  # f-string with a nested format spec
    text = """  a
	b #c  """
    total = 1 + \
        2
    if total: rows.append("x #y")
    lam = lambda v: (v
                     + 1)
    return rows, text, total, lam(1), "é×"


def raising():
    return 1 / 0
'''


def test_tricky_constructs_strip_to_the_same_behaviour():
    stripped = pack_script.strip_source(TRICKY)
    assert stripped.count("\n") == TRICKY.count("\n") and "#c" in stripped and "#y" in stripped
    assert "comment" not in stripped.replace("no comment", "") and "docstring" not in stripped.lower()
    spaces: list[dict] = [{}, {}]
    for space, source in zip(spaces, (TRICKY, stripped)):
        exec(compile(source, "tricky.py", "exec"), space)
    assert spaces[0]["table"]() == spaces[1]["table"]() and spaces[1]["table"]()[1] == "  a\n\tb #c  "
    assert spaces[0]["Point"]().norm() == spaces[1]["Point"]().norm()
    assert spaces[1]["Point"].__annotations__ == {"x": "int"}
    for space in spaces:
        with pytest.raises(ZeroDivisionError) as info:
            space["raising"]()
        assert traceback.extract_tb(info.value.__traceback__)[-1].lineno == TRICKY.count("\n")  # the last line
    with pytest.raises(pack_script.PackError, match="__doc__"):  # it would read what stripping drops
        pack_script.strip_source('"""Usage."""\nimport argparse\nparser = argparse.ArgumentParser(__doc__)\n')


def test_seven_bit_text_round_trips_every_byte_in_a_plain_literal():
    rng = random.Random(0)
    cases = [bytes(range(256)), b"\0" * 9, b"\0\1", b"\xff", bytes(rng.randrange(256) for _ in range(5000))]
    cases += [bytes(rng.randrange(256) for _ in range(n)) for n in range(1, 40)]
    for data in cases:
        text = pack_script.encode_text(data)
        assert not set(text) & set(pack_script.UNSAFE) and all(ord(c) < 0x180 for c in text)
        assert ast.literal_eval(f'"{text}"') == text  # a one-line "..." literal holds it unchanged
        assert pack_script.decode_text(text) == data
        assert len(text) == -(-len(data) * 8 // 7)


def test_packing_is_deterministic_and_unpacks_to_the_stripped_source():
    assert pack_script.pack(SOURCE) == PACKED
    assert pack_script.unpack(PACKED) == pack_script.strip_source(SOURCE)
    assert "\0" not in PACKED and "\r" not in PACKED  # a text file, kept as it is by any checkout
    assert PACKED.count("\n") == 6  # the two header lines, the one-line blob, the exec statement


def load(path: Path):
    spec = importlib.util.spec_from_file_location("train_gpt_packed_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_the_packed_module_defines_the_same_names_at_the_same_lines(tmp_path):
    packed = load(write_packed(tmp_path))
    names = [{k for k in vars(m) if not k.startswith("__")} for m in (packed, train_gpt)]  # (torch.compile adds
    assert names[0] == names[1]  # __-names to the globals of code it compiled)
    assert packed.__file__ == str(tmp_path / "train_gpt_packed.py")
    assert dataclasses.asdict(packed.Config()) == dataclasses.asdict(train_gpt.Config())
    assert packed.PRESETS == train_gpt.PRESETS
    own = [(name, obj) for name, obj in vars(train_gpt).items() if getattr(obj, "__module__", "") == "train_gpt"]
    functions = [(f"{name}.{k}", getattr(getattr(packed, name), k), v) for name, obj in own if isinstance(obj, type)
                 for k, v in vars(obj).items() if hasattr(v, "__code__")]
    functions += [(name, getattr(packed, name), obj) for name, obj in own if hasattr(obj, "__code__")]
    assert len(functions) > 100
    for name, packed_fn, fn in functions:  # (methods that dataclasses generate are the same in both)
        # torch wraps an optimizer's step (no_grad, then a profiling hook once the class is first instantiated)
        packed_fn, fn = inspect.unwrap(packed_fn), inspect.unwrap(fn)
        filename = fn.__code__.co_filename.replace(train_gpt.__file__, "train_gpt_readable.py")
        assert (packed_fn.__code__.co_filename, packed_fn.__code__.co_firstlineno) == (
            filename, fn.__code__.co_firstlineno), name
    with pytest.raises(TypeError) as info:
        packed.budget_line("artifact", None, 1)
    frame = traceback.extract_tb(info.value.__traceback__)[-1]
    assert frame.filename == "train_gpt_readable.py" and frame.name == "budget_line"
    assert frame.line == SOURCE.splitlines()[frame.lineno - 1].strip()  # the readable line, found in linecache


def test_the_lzma_form_runs_too(monkeypatch, tmp_path):
    """Brotli is smaller on today's source; the lzma form (the other candidate) extracts the same program."""
    monkeypatch.setattr(pack_script, "CODECS", {"lzma": pack_script.CODECS["lzma"]})
    text = pack_script.pack(SOURCE)
    assert pack_script.HEADER.match(text).group(3) == "lzma" and len(text.encode("utf-8")) <= 40_000
    assert pack_script.unpack(text) == pack_script.strip_source(SOURCE)
    (tmp_path / "train_gpt_packed.py").write_text(text, encoding="utf-8")
    module = load(tmp_path / "train_gpt_packed.py")
    assert dataclasses.asdict(module.Config()) == dataclasses.asdict(train_gpt.Config())


def test_the_packed_model_traces_as_one_graph_and_computes_the_same_loss(tmp_path):
    """torch.compile (Dynamo + AOT autograd, fullgraph) of code whose file is the packed copy's label."""
    packed = load(write_packed(tmp_path))
    cfg = tiny_config()
    losses = []
    for module in (train_gpt, packed):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = module.GPT(module.Config(**dataclasses.asdict(cfg)))
        compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
        ids = torch.randint(0, cfg.vocab_size, (2, cfg.train_seq_len))
        losses.append(compiled(ids, 4, ids).mean())
    assert torch.equal(losses[0], losses[1])


def test_importing_the_packed_copy_has_no_side_effects(tmp_path):
    write_packed(tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    code = ("import os, torch, train_gpt_packed; "
            "assert not torch.cuda.is_initialized(); "
            "print(sorted(os.listdir('.')))")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CUDA_VISIBLE_DEVICES": "", "MODEL_DIM": "not-a-number"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]" and out.stderr == ""


def test_dry_run_prints_the_same_lines_but_the_code_bytes(tmp_path):
    packed = write_packed(tmp_path)
    env = {**os.environ, "DRY_RUN": "1", "MODEL_DIM": "768"}
    outs = [subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=120) for script in (REPO / "train_gpt.py", packed)]
    assert [o.returncode for o in outs] == [0, 0], outs[1].stderr
    readable, packed_lines = (o.stdout.splitlines() for o in outs)
    assert readable[:-1] == packed_lines[:-1] and len(readable) > 20
    sizes = [re.fullmatch(r"artifact_estimate code_bytes:(\d+) model_bytes:(\d+) .*", out[-1]).groups()
             for out in (readable, packed_lines)]
    assert sizes[0][1] == sizes[1][1]
    assert int(sizes[1][0]) == len(PACKED.encode("utf-8")) and int(sizes[0][0]) == len(SOURCE.encode("utf-8"))


# --- a real tiny run of each, both recorded (RECORD=1) ---


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_subset) -> dict:
    """The same tiny run (same env, RUN_ID, seed) from a checkout in miniature with train_gpt.py and from one with
    train_gpt_packed.py beside it; {"readable"|"packed": (workspace, stdout, log text)}."""
    env = tiny_env(demo_subset, SEED="1", RUN_ID="same", RECORD="1")
    result = {}
    for kind in ("readable", "packed"):
        ws = tmp_path_factory.mktemp(kind)
        shutil.copyfile(REPO / "train_gpt.py", ws / "train_gpt.py")
        shutil.copyfile(REPO / "requirements.txt", ws / "requirements.txt")
        (ws / "records").mkdir()
        for name in ("make_record.py", "significance.py", "pack_script.py"):
            shutil.copyfile(REPO / "records" / name, ws / "records" / name)
        (ws / "submission.json").write_text(json.dumps(TEMPLATE))
        if kind == "packed":
            tool = subprocess.run([sys.executable, "records/pack_script.py"], cwd=ws, capture_output=True,
                                  text=True, timeout=120)
            assert tool.returncode == 0, tool.stderr
            assert tool.stdout.startswith(f"pack:written path:train_gpt_packed.py bytes:{len(PACKED.encode())} ")
        script = ws / ("train_gpt.py" if kind == "readable" else "train_gpt_packed.py")
        out = subprocess.run([sys.executable, str(script)], env=env, cwd=ws, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        result[kind] = (ws, out.stdout, (ws / "logs" / "same.txt").read_text(encoding="utf-8"))
    return result


TIMING = re.compile(r"\b(\w*time\w*|\w+_ms|step_avg|started|code_bytes|total_bytes|headroom_bytes):\S+")


def comparable(lines: str) -> list[str]:
    """The lines without what differs between any two runs (times) or between the two scripts (code bytes)."""
    return [TIMING.sub(r"\1:_", line) for line in lines.splitlines()]


def test_the_packed_run_logs_the_same_lines_and_weights(runs):
    (_, readable_out, readable_log), (ws, packed_out, packed_log) = runs["readable"], runs["packed"]
    packed_source = (ws / "train_gpt_packed.py").read_text(encoding="utf-8")
    assert readable_log.startswith(SOURCE + "\n") and packed_log.startswith(packed_source + "\n")
    readable_lines = comparable(readable_log[len(SOURCE) + 1:])
    packed_lines = comparable(packed_log[len(packed_source) + 1:])
    assert readable_lines == packed_lines and len(packed_lines) > 30
    assert comparable(readable_out) == comparable(packed_out)
    weights = re.findall(r"^weights_sha256:\w+$", packed_log, re.M)
    assert len(weights) == 1 and weights == re.findall(r"^weights_sha256:\w+$", readable_log, re.M)
    sizes = re.search(r"^artifact code_bytes:(\d+) model_bytes:(\d+) total_bytes:(\d+)", packed_log, re.M).groups()
    assert int(sizes[0]) == len(PACKED.encode("utf-8")) and int(sizes[0]) + int(sizes[1]) == int(sizes[2])
    assert re.search(r"^record:written path:\S+", packed_log, re.M)


def record_folder(stdout: str, ws: Path) -> Path:
    return ws / re.search(r"^record:written path:(\S+) ", stdout, re.M).group(1)


def test_the_records_folder_counts_the_packed_file_and_keeps_the_readable_source(runs, demo_subset):
    ws, out, _ = runs["packed"]
    folder = record_folder(out, ws)
    assert (folder / "train_gpt.py").read_bytes() == (ws / "train_gpt_packed.py").read_bytes()
    assert (folder / "train_gpt_readable.py").read_bytes() == (REPO / "train_gpt.py").read_bytes()
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["bytes_code"] == len(PACKED.encode("utf-8"))
    assert sub["bytes_total"] == sub["bytes_code"] + (folder / "train_seed1.ptz").stat().st_size
    readme = (folder / "README.md").read_text()
    assert (f"train_gpt.py is {sub['bytes_code']:,} bytes (the file in this folder). It is packed; "
            "train_gpt_readable.py is its readable source (not counted") in readme
    readable_ws, readable_out, _ = runs["readable"]
    assert not (record_folder(readable_out, readable_ws) / "train_gpt_readable.py").exists()
    # The folder's packed copy runs there and reproduces the run's weights.
    env = tiny_env(demo_subset, SEED="1", RUN_ID="again", RECORD="1")
    rerun = subprocess.run([sys.executable, "train_gpt.py"], env=env, cwd=folder, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "record:skipped reason:no records/make_record.py next to train_gpt.py" in rerun.stdout
    weights = re.compile(r"^weights_sha256:\w+$", re.M)
    assert weights.findall(rerun.stdout) == weights.findall(out) and len(weights.findall(out)) == 1


def test_recording_after_the_source_changed_keeps_the_code_that_ran(runs, tmp_path, capsys):
    ws, out, _ = runs["packed"]
    shutil.copyfile(ws / "train_gpt_packed.py", tmp_path / "train_gpt_packed.py")
    (tmp_path / "train_gpt.py").write_text(SOURCE + "# edited after packing\n", encoding="utf-8")
    (tmp_path / "submission.json").write_text(json.dumps(TEMPLATE))
    code = make_record.main(["--log", str(ws / "logs" / "same.txt"), "--script", str(tmp_path / "train_gpt_packed.py"),
                             "--records-root", str(tmp_path / "records")])
    captured = capsys.readouterr()
    assert code == 0, captured.out
    assert "record:note no train_gpt.py with sha256:" in captured.err
    folder = Path(re.search(r"^record:written path:(\S+) ", captured.out, re.M).group(1))
    assert (folder / "train_gpt_readable.py").read_text(encoding="utf-8") == pack_script.strip_source(SOURCE)
    # A readable script is recorded as before: no second file.
    assert pack_script.readable_source(REPO / "train_gpt.py", print) is None
