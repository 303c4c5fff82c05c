"""The house rules of train_gpt.py that a machine can check (see the developers' guide)."""

from __future__ import annotations

import ast
import re

from conftest import REPO

SOURCE = (REPO / "train_gpt.py").read_text(encoding="utf-8")
TREE = ast.parse(SOURCE)


def functions():
    return [n for n in ast.walk(TREE) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_banners_are_numbered_in_order_and_match_the_table_of_contents():
    banners = re.findall(r"^# === (\d+)\. ([A-Z ]+) ===$", SOURCE, re.M)
    assert [int(n) for n, _ in banners] == list(range(1, len(banners) + 1))
    toc = re.findall(r"^ {1,2}(\d+)\. ([A-Z]+(?: [A-Z]+)*)", ast.get_docstring(TREE), re.M)
    assert [(int(n), name) for n, name in toc] == [(int(n), name.strip()) for n, name in banners]


def test_function_sizes():
    sizes = {f.name: f.end_lineno - f.lineno + 1 for f in functions()}
    assert max(sizes.values()) <= 80, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
    assert sizes["main"] <= 60


def test_environment_and_cuda_stay_in_their_places():
    owners = {}
    for f in functions():
        body = ast.get_source_segment(SOURCE, f)
        if "os.environ" in body:
            owners.setdefault("environ", set()).add(f.name)
    assert owners.get("environ", set()) <= {"main"}  # Config.from_env and Runtime take a mapping
    runtime = SOURCE[SOURCE.index("# === 3. RUNTIME ==="):SOURCE.index("# === 4. SCHEDULES ===")]
    elsewhere = SOURCE.replace(runtime, "")
    assert re.findall(r"[\"']cuda", elsewhere) == []  # device-agnostic core: no "cuda" outside the runtime


def test_module_level_code_is_only_definitions():
    allowed = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign, ast.If)
    for node in TREE.body[1:]:  # after the docstring
        assert isinstance(node, allowed), ast.dump(node)[:80]
        if isinstance(node, ast.If):  # only the __main__ guard
            assert ast.get_source_segment(SOURCE, node.test) == '__name__ == "__main__"'


def test_line_count_ratchet():
    """The rule is at most 1,600 lines. The merged file is over it (see the open trim work in the project notes);
    until that lands this ratchet only stops it from growing. Lower the number as lines come off."""
    assert SOURCE.count("\n") <= 2762
