"""The whole script in environments unlike ours, made real with a sitecustomize on PYTHONPATH (it runs at interpreter
start-up in every process, torchrun's workers included): the artifact codecs not installed (the challenge's RunPod
image has neither), and ranks whose weights diverge."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from test_main import SCRIPT, run, tiny_env

# sys.modules[name] = None makes `import name` raise ImportError, as for a package that is not installed.
SITE = """import os, sys
for name in filter(None, os.environ.get("BLOCK_IMPORTS", "").split(",")):
    sys.modules[name] = None
if os.environ.get("SEED_PLUS_RANK"):
    os.environ["SEED"] = str(1337 + int(os.environ.get("RANK", "0")))
"""


def site_env(tmp_path: Path, env: dict[str, str], **extra: str) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITE)
    return {**env, "PYTHONPATH": str(site), **extra}


def test_the_blocker_really_blocks(tmp_path):
    env = site_env(tmp_path, {}, BLOCK_IMPORTS="brotli,zstandard")
    out = run([sys.executable, "-c", "import brotli"], env, tmp_path)
    assert out.returncode == 1 and "ModuleNotFoundError: import of brotli halted" in out.stderr
    assert run([sys.executable, "-c", "import zstandard"], {**env, "BLOCK_IMPORTS": "brotli"}, tmp_path).returncode == 0


def test_dry_run_needs_no_codec(tmp_path):
    out = run([sys.executable, SCRIPT], site_env(tmp_path, {"DRY_RUN": "1"}, BLOCK_IMPORTS="brotli,zstandard"),
              tmp_path)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^artifact_estimate code_bytes:\d+ ", out.stdout, re.M)


def test_no_usable_codec_is_one_config_error_before_any_work(tmp_path, demo_subset):
    for blocked, compressor, missing in [("brotli,zstandard", "auto", "zstandard brotli"),
                                         ("brotli", "brotli", "brotli"), ("zstandard", "zstd", "zstandard")]:
        env = site_env(tmp_path, tiny_env(demo_subset, COMPRESSOR=compressor), BLOCK_IMPORTS=blocked)
        out = run([sys.executable, SCRIPT], env, tmp_path)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert out.stderr.startswith(f"config_error: COMPRESSOR={compressor} needs ")
        assert out.stderr.endswith(f"not installed: pip install {missing}\n")
        assert not (tmp_path / "logs").exists()


def test_one_missing_codec_falls_back_and_reading_needs_the_codec_used(tmp_path, demo_subset):
    env = site_env(tmp_path, tiny_env(demo_subset, ITERATIONS="2", QUANT_METHOD="clip", EVAL_STRIDE="0"),
                   BLOCK_IMPORTS="zstandard")
    out = run([sys.executable, SCRIPT], env, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"^codec_fallback: zstandard not installed \(pip install zstandard\); the artifact uses brotli "
                     r"only$", out.stdout, re.M)
    assert re.search(r"^artifact path:logs/tiny.ptz method:clip gptq_fallbacks:0 codec:brotli brotli_bytes:\d+ "
                     r"time_ms:\d+$", out.stdout, re.M)
    want = re.search(r"^final_roundtrip_exact .*$", out.stdout, re.M).group(0)
    eval_env = {**env, "EVAL_ONLY": "logs/tiny.ptz", "RUN_ID": "check"}
    again = run([sys.executable, SCRIPT], eval_env, tmp_path)  # brotli is there: the artifact reads back
    assert again.returncode == 0 and re.search(r"^final_roundtrip_exact .*$", again.stdout, re.M).group(0) == want
    assert "codec_fallback" not in again.stdout  # EVAL_ONLY compresses nothing
    blocked = run([sys.executable, SCRIPT], {**eval_env, "BLOCK_IMPORTS": "brotli"}, tmp_path)
    assert blocked.returncode == 2 and blocked.stderr.count("\n") == 1, blocked.stderr
    assert blocked.stderr == ("artifact_error: logs/tiny.ptz: compressed with brotli, not installed here: "
                              "pip install brotli\n")
