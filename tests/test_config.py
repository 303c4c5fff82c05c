"""Section 2 (CONFIG): defaults, env parsing, presets, validation, batch arithmetic."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

import train_gpt
from train_gpt import Config, ConfigError

# The #1453 submitted run (README command + SUMMARY block, spec section 1), plus the defaults it relied on.
PR1453 = dict(
    model_dim=880, mlp_mult=3.0, num_layers=3, num_repeats=4, num_heads=8, num_kv_heads=4, num_value_embeds=2,
    vocab_size=1024, prog_depth="0.30:2,0.50:3,1.0:4", warmdown_iters=3000, swa_enabled=True, swa_start_frac=0.6,
    swa_every=30, quant_levels=63, mlp_quant_levels=16, matrix_lr=0.018, scalar_lr=0.018, tied_embed_lr=0.021,
    tied_embed_init_std=0.005, muon_wd=0.04, muon_momentum=0.95, muon_momentum_warmup_start=0.85,
    muon_momentum_warmup_steps=500, muon_backend_steps=5, beta1=0.9, beta2=0.95, adam_eps=1e-8,
    train_batch_tokens=524288, train_seq_len=1024, max_wallclock_seconds=600.0, iterations=20000,
    grad_clip_norm=0.3, xsa_last_n=4, qk_gain_init=1.5, logit_softcap=30.0, rope_base=10000.0,
    val_batch_size=524288, train_log_every=200, seed=1337,
    data_path="./data/datasets/fineweb10B_sp1024", tokenizer_path="./data/tokenizers/fineweb_1024_bpe.model",
)


# --- defaults and presets ---


def test_defaults_are_the_pr1453_submitted_run():
    cfg = Config()
    got = {name: getattr(cfg, name) for name in PR1453}
    assert got == PR1453
    assert cfg.head_dim == 110
    assert cfg.depth_schedule == ((0.30, 2), (0.50, 3), (1.0, 4))


def test_from_env_with_empty_environment_equals_defaults():
    assert Config.from_env({}) == Config()


def test_preset_pr1453_equals_defaults():
    assert Config.from_env({"PRESET": "pr1453"}) == Config()


def test_preset_demo_values():
    cfg = Config.from_env({"PRESET": "demo"})
    preset = train_gpt.PRESETS["demo"]
    # Every value the preset names is applied; everything else keeps the #1453 value.
    assert {k: getattr(cfg, k) for k in preset} == preset
    assert all(getattr(cfg, f.name) == f.default for f in dataclasses.fields(Config) if f.name not in preset)
    # It points at what data/prepare_demo.py builds (vocab 1024, so VOCAB_SIZE stays the default).
    assert cfg.data_path == "./data/datasets/demo_sp1024"
    assert cfg.tokenizer_path == "./data/tokenizers/demo_1024_bpe.model"
    assert cfg.vocab_size == 1024
    # CPU-sized: a smaller model, a smaller batch, a capped validation split, still a wallclock run.
    assert cfg.model_dim < 880 and cfg.train_batch_tokens < 524288 and cfg.train_seq_len <= 1024
    assert 0 < cfg.val_max_tokens and cfg.max_wallclock_seconds > 0
    # The demo batch splits into whole rows on 1 and 2 CPU processes (the documented demo launches).
    for world in (1, 2):
        local = train_gpt.local_batch_tokens(cfg, world)
        assert local % cfg.train_seq_len == 0
        assert local * world * train_gpt.grad_accum_for(cfg, world) == cfg.train_batch_tokens


def test_explicit_env_vars_override_a_preset():
    env = {"PRESET": "demo", "MODEL_DIM": "96", "SWA_EVERY": "7", "VAL_MAX_TOKENS": "0"}
    cfg = Config.from_env(env)
    assert (cfg.model_dim, cfg.swa_every, cfg.val_max_tokens) == (96, 7, 0)
    preset = train_gpt.PRESETS["demo"]
    assert preset["swa_every"] != 7 and preset["val_max_tokens"] != 0  # the overrides really override
    rest = {k: v for k, v in preset.items() if k not in ("model_dim", "swa_every", "val_max_tokens")}
    assert {k: getattr(cfg, k) for k in rest} == rest  # the rest is still the preset's
    cfg = Config.from_env({"PRESET": "pr1453", "WARMDOWN_ITERS": "10"})
    assert cfg.warmdown_iters == 10 and cfg.model_dim == 880


def test_unknown_preset_is_rejected():
    with pytest.raises(ConfigError, match="PRESET"):
        Config.from_env({"PRESET": "record"})


# --- parsing by annotation ---


@pytest.mark.parametrize("key, raw, field, value", [
    ("MODEL_DIM", "768", "model_dim", 768),
    ("MODEL_DIM", " 768 ", "model_dim", 768),
    ("ITERATIONS", "5", "iterations", 5),
    ("MATRIX_LR", "0.02", "matrix_lr", 0.02),
    ("MATRIX_LR", "1e-3", "matrix_lr", 1e-3),
    ("MLP_MULT", "2", "mlp_mult", 2.0),
    ("MAX_WALLCLOCK_SECONDS", "0", "max_wallclock_seconds", 0.0),
    ("RUN_ID", "my_run", "run_id", "my_run"),
    ("DEVICE", "cpu", "device", "cpu"),
    ("COMPILE", "0", "compile", "0"),
    ("PROG_DEPTH", "0.5:2,1.0:4", "prog_depth", "0.5:2,1.0:4"),
    ("SWA_ENABLED", "0", "swa_enabled", False),
    ("SWA_ENABLED", "1", "swa_enabled", True),
    ("SWA_ENABLED", "false", "swa_enabled", False),
    ("SWA_ENABLED", "true", "swa_enabled", True),
    ("AUTOCAST", "0", "autocast", "0"),
    ("DRY_RUN", "TRUE", "dry_run", True),
])
def test_from_env_parses_by_annotation(key, raw, field, value):
    cfg = Config.from_env({key: raw})
    got = getattr(cfg, field)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("raw", ["2", "maybe", "", "-1", "10", "tru"])
def test_bool_knobs_are_strict(raw):
    with pytest.raises(ConfigError, match="SWA_ENABLED"):
        Config.from_env({"SWA_ENABLED": raw})


@pytest.mark.parametrize("key, raw", [
    ("MODEL_DIM", "abc"),
    ("MODEL_DIM", "880.0"),  # an int knob does not accept a float spelling
    ("MODEL_DIM", ""),
    ("NUM_REPEATS", "four"),
    ("MATRIX_LR", "fast"),
    ("MAX_WALLCLOCK_SECONDS", "10m"),
    ("TRAIN_BATCH_TOKENS", "512k"),
])
def test_non_numbers_are_rejected_naming_the_knob(key, raw):
    with pytest.raises(ConfigError, match=key):
        Config.from_env({key: raw})


# --- validation: every error is a ConfigError naming the knob ---


@pytest.mark.parametrize("env, knob", [
    ({"NUM_HEADS": "7"}, "NUM_HEADS"),  # 7 does not divide 880
    ({"MODEL_DIM": "888", "NUM_HEADS": "8", "NUM_KV_HEADS": "4"}, "MODEL_DIM"),  # head dim 111 is odd
    ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS"),  # 3 does not divide 8
    ({"PROG_DEPTH": "0.3-2"}, "PROG_DEPTH"),
    ({"PROG_DEPTH": "abc"}, "PROG_DEPTH"),
    ({"PROG_DEPTH": "0.3:x"}, "PROG_DEPTH"),
    ({"PROG_DEPTH": ""}, "PROG_DEPTH"),
    ({"PROG_DEPTH": "0.3:2,,1.0:4"}, "PROG_DEPTH"),
    ({"PROG_DEPTH": "0.3:5,1.0:4"}, "PROG_DEPTH"),  # repeats > NUM_REPEATS
    ({"PROG_DEPTH": "0.3:0,1.0:4"}, "PROG_DEPTH"),  # repeats < 1
    ({"PROG_DEPTH": "0.5:2,0.3:3,1.0:4"}, "PROG_DEPTH"),  # fractions not increasing
    ({"PROG_DEPTH": "0.5:2,0.5:3,1.0:4"}, "PROG_DEPTH"),  # repeated fraction
    ({"PROG_DEPTH": "0.5:2,1.5:4"}, "PROG_DEPTH"),  # fraction past 1
    ({"PROG_DEPTH": "0.3:2,1.0:3"}, "PROG_DEPTH"),  # does not end at NUM_REPEATS
    ({"NUM_REPEATS": "5"}, "NUM_REPEATS"),  # default schedule ends at 4
    ({"NUM_REPEATS": "0"}, "NUM_REPEATS"),
    ({"TRAIN_SEQ_LEN": "0"}, "TRAIN_SEQ_LEN"),
    ({"TRAIN_SEQ_LEN": "1000"}, "TRAIN_BATCH_TOKENS"),  # 524288 is no multiple of 1000
    ({"VOCAB_SIZE": "70000"}, "VOCAB_SIZE"),
    ({"SWA_START_FRAC": "0"}, "SWA_START_FRAC"),
    ({"SWA_START_FRAC": "1.5"}, "SWA_START_FRAC"),
    ({"QUANT_LEVELS": "128"}, "QUANT_LEVELS"),
    ({"MLP_QUANT_LEVELS": "0"}, "MLP_QUANT_LEVELS"),
    ({"DEVICE": "tpu"}, "DEVICE"),
    ({"COMPILE": "yes"}, "COMPILE"),
    ({"AUTOCAST": "bf16"}, "AUTOCAST"),
    ({"TOKENIZER_PATH": "tok.vocab"}, "TOKENIZER_PATH"),
    ({"WARMDOWN_ITERS": "-1"}, "WARMDOWN_ITERS"),
    ({"LOGIT_SOFTCAP": "0"}, "LOGIT_SOFTCAP"),
    ({"MLP_MULT": "-2"}, "MLP_MULT"),
    ({"EVAL_SEQ_LEN": "0"}, "EVAL_SEQ_LEN"),
    ({"EVAL_STRIDE": "1025"}, "EVAL_STRIDE"),  # a stride past the window would skip targets
    ({"EVAL_STRIDE": "-1"}, "EVAL_STRIDE"),
    ({"EVAL_BATCH_SEQS": "0"}, "EVAL_BATCH_SEQS"),
    ({"MIXER": "hedge"}, "MIXER"),
    ({"MIXER_ETA": "-1"}, "MIXER_ETA"),
    ({"HEDGE_ETA": "nan"}, "HEDGE_ETA"),
])
def test_validation_errors_name_the_knob(env, knob):
    with pytest.raises(ConfigError, match=knob):
        Config.from_env(env)


@pytest.mark.parametrize("key, raw", [
    ("MATRIX_LR", "-0.01"),
    ("TIED_EMBED_LR", "nan"),
    ("SCALAR_LR", "-1"),
    ("BETA2", "1.5"),
    ("ADAM_EPS", "-1"),
    ("MUON_MOMENTUM", "1.5"),
    ("MAX_WALLCLOCK_SECONDS", "nan"),  # run_progress -> nan: full depth from step 0, no warmdown, no stop
    ("GRAD_CLIP_NORM", "nan"),  # silently disables clipping (nan > 0 is False)
])
def test_out_of_range_optimizer_and_float_knobs_are_config_errors(key, raw):
    # ConfigError's contract: a bad knob is one line and exit code 2 before any work starts. Without range
    # checks these surface late (torch's Adam/Muon constructors raise a plain ValueError for the LRs, BETA2 and
    # ADAM_EPS, after the process group is up) or never (MUON_MOMENTUM > 1 diverges; a nan budget or clip norm
    # silently changes the run).
    with pytest.raises(ConfigError, match=key):
        Config.from_env({key: raw})


def test_validation_also_runs_on_direct_construction():
    with pytest.raises(ConfigError, match="NUM_KV_HEADS"):
        Config(num_kv_heads=3)
    with pytest.raises(ConfigError, match="PROG_DEPTH"):
        Config(num_repeats=5, prog_depth="0.3:2,1.0:4")


def test_eval_knobs_defaults_and_edges():
    cfg = Config()
    assert (cfg.eval_seq_len, cfg.eval_stride, cfg.eval_batch_seqs, cfg.mixer) == (1024, 256, 32, "normalized")
    assert (cfg.mixer_eta, cfg.hedge_eta) == (1.0, 0.1)
    assert Config(eval_stride=0).eval_stride == 0  # skips the sliding and mixer evals
    assert Config(eval_stride=1024, mixer="off").eval_stride == 1024  # non-overlapping windows
    assert Config.from_env({"MIXER": "reference_hedge"}).mixer == "reference_hedge"


def test_valid_non_default_schedules_are_accepted():
    cfg = Config.from_env({"NUM_REPEATS": "5", "PROG_DEPTH": "0.3:2,0.5:3,0.75:4,1.0:5"})
    assert cfg.depth_schedule == ((0.3, 2), (0.5, 3), (0.75, 4), (1.0, 5))
    assert Config(prog_depth="1.0:4").depth_schedule == ((1.0, 4),)


@pytest.mark.parametrize("typo, meant", [
    ("WARMDOWN_ITER", "WARMDOWN_ITERS"),
    ("MODEL_DIMS", "MODEL_DIM"),
    ("NUM_REPEAT", "NUM_REPEATS"),
    ("SWA_EVERYY", "SWA_EVERY"),
])
def test_near_miss_env_var_names_are_rejected(typo, meant):
    with pytest.raises(ConfigError, match=typo) as err:
        Config.from_env({typo: "1"})
    assert meant in re.findall(r"[A-Z_]+", str(err.value))  # the suggestion, as a whole word


@pytest.mark.parametrize("typo", ["PRESETS", "PRESE", "PRESET_"])
def test_near_miss_of_preset_is_rejected(typo):
    # PRESET is not a dataclass field, but a typo of it is just as silent: PRESETS=demo would run the full
    # 23.7M-parameter record config on a CPU.
    with pytest.raises(ConfigError, match=typo) as err:
        Config.from_env({typo: "demo"})
    assert "PRESET" in re.findall(r"[A-Z_]+", str(err.value))  # the suggestion, as a whole word


def test_unrelated_env_vars_are_ignored():
    env = {
        "PATH": "/usr/bin:/bin", "HOME": "/root", "OMP_NUM_THREADS": "2", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
        "GROUP_RANK": "0", "ROLE_RANK": "0", "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": "1",
        "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
        "CUDA_VISIBLE_DEVICES": "0,1", "PYTHONPATH": "/x", "LD_LIBRARY_PATH": "/y", "MKL_NUM_THREADS": "2",
        "TOKENIZERS_PARALLELISM": "false",
    }
    assert Config.from_env(env) == Config()


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model_dim = 512  # type: ignore[misc]


def test_parse_prog_depth():
    assert Config(prog_depth="0.30:2, 0.50:3 ,1.0:4").depth_schedule == ((0.3, 2), (0.5, 3), (1.0, 4))
    with pytest.raises(ConfigError, match="PROG_DEPTH"):
        Config(prog_depth="0.3")


# --- batch arithmetic ---


@pytest.mark.parametrize("world, accum", [(1, 8), (2, 4), (4, 2), (8, 1), (3, 1), (16, 1)])
def test_grad_accum_for_defaults_to_8_over_world(world, accum):
    assert train_gpt.grad_accum_for(Config(), world) == accum


def test_grad_accum_steps_override():
    cfg = Config(grad_accum_steps=3, train_batch_tokens=3 * 2 * 1024)
    assert train_gpt.grad_accum_for(cfg, 1) == 3
    assert train_gpt.grad_accum_for(cfg, 2) == 3
    assert train_gpt.local_batch_tokens(cfg, 2) == 1024


@pytest.mark.parametrize("world, local", [(1, 65536), (2, 65536), (4, 65536), (8, 65536), (16, 32768)])
def test_local_batch_tokens_keeps_the_global_batch(world, local):
    cfg = Config()
    got = train_gpt.local_batch_tokens(cfg, world)
    assert got == local
    assert got * world * train_gpt.grad_accum_for(cfg, world) == cfg.train_batch_tokens


@pytest.mark.parametrize("env, world", [
    ({}, 3),  # 524288 / 3 is not whole
    ({"TRAIN_BATCH_TOKENS": "4096"}, 1),  # 4096 / 8 micro-steps = 512 tokens, half a 1024 row
    ({"TRAIN_BATCH_TOKENS": "6144", "GRAD_ACCUM_STEPS": "1"}, 4),  # 1536 tokens per rank
])
def test_local_batch_tokens_rejects_partial_rows(env, world):
    cfg = Config.from_env(env)
    with pytest.raises(ConfigError, match="TRAIN_BATCH_TOKENS"):
        train_gpt.local_batch_tokens(cfg, world)



# --- weight averaging and bit allocation ---


def test_ema_and_high_tensor_knobs_default_off_and_are_validated():
    cfg = Config()
    assert cfg.ema_decay == 0.0 and cfg.quant_high_tensors == 0
    assert Config.from_env({"EMA_DECAY": "0.997", "SWA_ENABLED": "0"}).ema_decay == 0.997
    assert Config.from_env({"QUANT_HIGH_TENSORS": "8"}).quant_high_tensors == 8
    for env, message in [
        ({"EMA_DECAY": "0.997"}, "EMA_DECAY=0.997 replaces SWA as the exported average; set SWA_ENABLED=0"),
        ({"EMA_DECAY": "1", "SWA_ENABLED": "0"}, "EMA_DECAY must be in [0, 1), got 1.0"),
        ({"EMA_DECAY": "-0.5", "SWA_ENABLED": "0"}, "EMA_DECAY must be in [0, 1), got -0.5"),
        ({"QUANT_HIGH_TENSORS": "-1"}, "QUANT_HIGH_TENSORS must be >= 0, got -1"),
        ({"QUANT_HIGH_TENSORS": "4", "QUANT_METHOD": "clip"}, "QUANT_HIGH_TENSORS=4 ranks tensors by GPTQ Hessians"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            Config.from_env(env)


# --- one declaration per knob: kinds, derived lists and the README table ---


def readme_knob_rows() -> list[tuple[list[str], str, list[str]]]:
    """(knob names, kind, defaults) of each row of README.md's Configuration table."""
    text = (Path(train_gpt.__file__).parent / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Configuration\n")[1].split("\n#")[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        if line.startswith("| `") and cells[0] != "`PRESET`":
            defaults = [d.strip().strip("`") for d in re.split(r" / |, ", cells[2])]
            rows.append((re.findall(r"`([A-Z0-9_]+)`", cells[0]), cells[1], defaults))
    return rows


def readme_default(value: object) -> str:
    if isinstance(value, bool):
        return str(int(value))
    return "empty" if value == "" else str(value)


def test_readme_table_lists_every_knob_with_its_declared_kind_and_default():
    fields = {f.name.upper(): f for f in dataclasses.fields(Config)}
    seen = []
    for names, kind, defaults in readme_knob_rows():
        assert len(names) == len(defaults), names
        for name, default in zip(names, defaults):
            assert name in fields, f"README names {name}, which is no knob"
            declared = fields[name].default
            assert fields[name].metadata["kind"] == kind, name
            if isinstance(declared, (int, float)) and not isinstance(declared, bool):
                assert float(default) == declared, name
            else:
                assert default == readme_default(declared), name
            seen.append(name)
    assert sorted(seen) == sorted(fields), set(fields) ^ set(seen)  # every knob has exactly one row


def test_model_fields_and_resume_key_derive_from_the_kinds():
    assert train_gpt.MODEL_FIELDS == (
        "vocab_size", "num_layers", "num_repeats", "model_dim", "num_heads", "num_kv_heads", "mlp_mult",
        "num_value_embeds", "xsa_last_n", "logit_softcap", "rope_base", "prog_depth", "recur_layers", "loop_embed",
        "cross_repeat", "untie_scalars", "untie_repeat_mlp", "unet", "parallel_last_n", "bigram_vocab_size",
        "bigram_dim", "smear_gate", "rope_dims", "ln_scale", "ve_dim", "ve_layers", "disable_layer0_attn",
        "mlp_negative_slope")  # what old artifacts carry
    key = json.loads(train_gpt.resume_key(Config()))
    assert set(key) == set(train_gpt.knob_names(train_gpt.MODEL, train_gpt.TRAIN))
    assert key["max_wallclock_seconds"] == 600.0 - Config().gptq_reserve_seconds  # the training budget
    after = Config(run_id="x", record=False, dry_run=True, quant_levels=31, compressor="zstd", mixer="off",
                   eval_stride=64, gptq_calib_batches=4)
    assert train_gpt.resume_key(after) == train_gpt.resume_key(Config())
    for change in ({"seed": 1}, {"model_dim": 896}, {"matrix_lr": 0.02}, {"quant_method": "clip"}):
        assert train_gpt.resume_key(Config(**change)) != train_gpt.resume_key(Config()), change


@pytest.mark.parametrize("env, message", [
    ({"MODEL_DIM": "0"}, "MODEL_DIM must be > 0, got 0"),
    ({"MATRIX_LR": "inf"}, "MATRIX_LR must be a finite number >= 0, got inf"),
    ({"SWA_START_FRAC": "0"}, "SWA_START_FRAC must be in (0, 1], got 0.0"),
    ({"QUANT_LEVELS": "128"}, "QUANT_LEVELS must be in [1, 127], got 128"),
    ({"AUTOCAST": "bf16"}, "AUTOCAST must be one of auto, 0, 1, got 'bf16'"),
])
def test_declared_ranges_and_choices_give_one_line_messages(env, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config.from_env(env)
