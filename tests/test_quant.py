"""Section 11 (QUANTIZATION): code ranges, exact dequantization, GPTQ vs clip vs ref, Hessians over repeats,
self-generated calibration, the artifact format and everything it must refuse, size accounting."""

from __future__ import annotations

import dataclasses
import io
import pickle
import re

import numpy as np
import pytest
import torch

import train_gpt
from train_gpt import (BUDGET_BYTES, GPT, Config, ConfigError, StoredTensor, artifact_config, budget_line,
                       collect_hessians, gptq_codes, pack_artifact, param_table, quantize_model, quantize_rows,
                       row_scales, unpack_artifact)


class CpuRuntime:
    """What the quantization code needs of Runtime, for one CPU process; keeps the lines it logs."""
    device, rank, world_size = torch.device("cpu"), 0, 1

    def __init__(self):
        self.lines = []

    def log(self, line):
        self.lines.append(line)

    def gather_objects(self, obj):
        return [obj]

    def autocast(self):
        return torch.autocast("cpu", enabled=False)

    def all_reduce(self, tensor, op="sum"):
        return tensor

    def all_max(self, *values):
        return list(values)


def trained_like(cfg: Config, seed: int = 0) -> GPT:
    """A tiny model whose zero-initialised projections and scalars are filled, so every tensor is non-trivial."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def gaussian(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


# --- codes and scales ---


@pytest.mark.parametrize("levels", [1, 16, 63, 127])
@pytest.mark.parametrize("method", ["clip", "ref"])
def test_codes_span_exactly_minus_levels_to_levels(levels, method):
    w = gaussian(64, 200)
    scales = row_scales(w, levels, method)
    codes = quantize_rows(w, scales, levels)
    assert codes.min() >= -levels and codes.max() <= levels
    assert codes.min() == -levels and codes.max() == levels  # clipping at a fraction of the max saturates
    assert torch.equal(codes, codes.round())
    hessian = gaussian(200, 200, seed=1).T @ gaussian(200, 200, seed=1)
    gptq = gptq_codes(w, hessian, scales, levels)
    assert gptq.abs().max() <= levels and torch.equal(gptq, gptq.round())


def test_clip_scales_are_fp16_exact_and_all_zero_rows_survive():
    w = gaussian(8, 50)
    w[3] = 0.0
    scales = row_scales(w, 16, "clip")
    assert torch.equal(scales, scales.half().float()) and (scales > 0).all()
    assert torch.equal(quantize_rows(w, scales, 16)[3], torch.zeros(50))


def test_dequantization_is_exact():
    cfg = Config(vocab_size=64, model_dim=32, num_heads=4, num_kv_heads=2)
    stored, _ = quantize_model(cfg, trained_like(cfg), {})
    for t in stored:
        if t.levels:
            want = t.values.astype(np.float64).reshape(len(t.scales), -1) * t.scales.astype(np.float64)[:, None]
            assert np.array_equal(t.dequantize().numpy().astype(np.float64), want.reshape(t.shape)), t.name


# --- GPTQ, clip and ref measured against each other ---


def correlated_layer(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x (4096, 128) with strongly correlated features and a weight w (64, 128)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(128) + 2 * torch.randn(128, 128, generator=g) / 128**0.5
    return torch.randn(4096, 128, generator=g) @ mix, torch.randn(64, 128, generator=g) * 0.02


@pytest.mark.parametrize("levels", [16, 63])
def test_gptq_beats_clip_on_layer_output_error(levels):
    x, w = correlated_layer(seed=levels)
    scales = row_scales(w, levels, "clip")
    out_error = lambda codes: (x @ (w - codes * scales[:, None]).T).square().sum()  # noqa: E731
    ratio = out_error(gptq_codes(w, x.T @ x, scales, levels)) / out_error(quantize_rows(w, scales, levels))
    assert ratio < 0.6  # measured 0.48-0.53 over seeds 0-2 and both levels


@pytest.mark.parametrize("levels, margin", [(16, 0.9), (63, 0.99)])
def test_clip_beats_ref_on_weight_error(levels, margin):
    w = gaussian(256, 880)
    errors = {}
    for method in ("clip", "ref"):
        scales = row_scales(w, levels, method)
        stored = scales.half().float()  # what the artifact keeps
        errors[method] = (w - quantize_rows(w, scales, levels) * stored[:, None]).square().sum()
    assert errors["clip"] < margin * errors["ref"]  # measured 0.83 (int5) and 0.977 (int7)


def test_gptq_falls_back_when_the_hessian_is_not_positive_definite():
    w = gaussian(4, 8)
    assert gptq_codes(w, -torch.eye(8), row_scales(w, 16, "clip"), 16) is None


def test_gptq_ignores_inputs_that_never_fire():
    x, w = correlated_layer(seed=0)
    x[:, :5] = 0.0
    codes = gptq_codes(w, x.T @ x, row_scales(w, 16, "clip"), 16)
    assert codes is not None and torch.equal(codes[:, :5], torch.zeros(64, 5))


# --- calibration ---


def test_hessians_accumulate_over_every_repeat_of_a_shared_block(tiny_cfg):
    cfg = tiny_cfg()
    model = trained_like(cfg)
    ids = torch.randint(cfg.vocab_size, (2, cfg.train_seq_len), generator=torch.Generator().manual_seed(0))
    seen = []
    hook = model.blocks[1].mlp.proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].flatten(0, -2)))
    hessians = collect_hessians(CpuRuntime(), model, [ids])
    hook.remove()
    assert len(seen) == cfg.num_repeats
    want = sum(x.T @ x for x in seen)
    assert torch.allclose(hessians["blocks.1.mlp.proj.weight"], want, rtol=1e-5, atol=1e-6)
    linears = {r.name for r in param_table(model) if r.name.startswith("blocks.")
               and r.rule.store in ("q_attn", "q_mlp")}
    assert set(hessians) == linears  # every nn.Linear, no embedding


class TrainLike:
    """Training micro-batches of 2 rows, the same ones each time it is made."""

    def __init__(self, cfg):
        self.cfg, self.gen, self.calls = cfg, torch.Generator().manual_seed(3), 0

    def next(self):
        self.calls += 1
        return (torch.randint(self.cfg.vocab_size, (2, self.cfg.train_seq_len), generator=self.gen),)


@pytest.mark.parametrize("method", ["clip", "ref"])
def test_only_gptq_calibrates(tiny_cfg, method):
    cfg = tiny_cfg(quant_method=method)
    rt, batches = CpuRuntime(), TrainLike(cfg)
    assert train_gpt.calibrate(cfg, rt, trained_like(cfg), batches, 1000.0, 8.0) == {}
    assert batches.calls == 0 and rt.lines == []
    assert train_gpt.QUANT_METHODS[method]["codes"] == "round"


def test_calibrate_collects_the_hessians_and_checks_the_reserve(tiny_cfg):
    cfg = tiny_cfg(gptq_calib_batches=2, max_wallclock_seconds=1.0, gptq_reserve_seconds=0.5)
    model = trained_like(cfg)
    rt = CpuRuntime()
    hessians = train_gpt.calibrate(cfg, rt, model, TrainLike(cfg), 5000.0, 0.5)  # 5 s of training > 1 s budget
    same = TrainLike(cfg)
    want = collect_hessians(CpuRuntime(), model, [same.next()[0] for _ in range(2)])
    assert list(hessians) == list(want) and all(torch.equal(hessians[n], want[n]) for n in want)
    assert re.fullmatch(r"quant method:gptq calib:train batches:2 time_ms:\d+ train_plus_calib_ms:\d+", rt.lines[0])
    assert rt.lines[1].startswith("gptq_calib_over_budget train_plus_calib_ms:") and len(rt.lines) == 2
    rt = CpuRuntime()
    train_gpt.calibrate(cfg, rt, model, TrainLike(cfg), 5000.0, 0.0)  # no reserve was taken: nothing to check
    assert len(rt.lines) == 1


# --- the artifact format ---


@pytest.fixture
def artifact(tiny_cfg):
    cfg = tiny_cfg()
    model = trained_like(cfg)
    with torch.no_grad():  # a parameter kept in bf16 must come back as bf16
        model.loop_embed.data = model.loop_embed.data.bfloat16()
    stored, _ = quantize_model(cfg, model, {})
    blob, sizes = pack_artifact(cfg, stored)
    return cfg, model, stored, blob, sizes


def test_roundtrip_restores_every_tensor_and_dtype(artifact):
    cfg, model, stored, blob, sizes = artifact
    header, loaded = unpack_artifact(blob)
    state = {t.name: t.dequantize() for t in loaded}
    params = dict(model.named_parameters())
    assert list(state) == [t.name for t in stored] and set(state) == set(params)
    rows = {r.name: r.rule.store for r in param_table(model)}
    for t_mem, t_file in zip(stored, loaded):
        name = t_mem.name
        assert state[name].dtype == params[name].dtype and state[name].shape == params[name].shape
        assert torch.equal(state[name], t_mem.dequantize())  # the file holds exactly what was quantized
        assert t_file.store == rows[name] and t_file.levels == train_gpt.store_levels(cfg, rows[name])
        if rows[name] == "fp32":
            assert torch.equal(state[name], params[name])
        elif rows[name] == "fp16":
            assert torch.equal(state[name], params[name].half().to(params[name].dtype))
    assert state["loop_embed"].dtype == torch.bfloat16
    assert header["config"] == {k: getattr(cfg, k) for k in train_gpt.MODEL_FIELDS}
    fresh = train_gpt.meta_model(artifact_config(cfg, header, {}))
    fresh.load_state_dict(state, strict=True, assign=True)
    ids = torch.randint(cfg.vocab_size, (1, 8))
    assert torch.isfinite(fresh(ids, cfg.num_repeats)).all()


def test_same_weights_give_identical_bytes(artifact, tiny_cfg):
    cfg, model, _, blob, _ = artifact
    again, _ = pack_artifact(cfg, quantize_model(cfg, model, {})[0])
    assert again == blob


def test_auto_keeps_the_smaller_codec_and_records_it(artifact):
    cfg, _, stored, blob, sizes = artifact
    assert set(sizes) == {"zstd", "brotli"}
    best = min(sizes, key=sizes.get)
    assert blob[9] == list(train_gpt.CODECS).index(best) and len(blob) == 8 + 2 + 8 + sizes[best] + 32
    for codec in ("zstd", "brotli"):
        single, only = pack_artifact(dataclasses.replace(cfg, compressor=codec), stored)
        assert list(only) == [codec] and single[9] == list(train_gpt.CODECS).index(codec)
        assert [t.name for t in unpack_artifact(single)[1]] == [t.name for t in stored]


def one_line_error(blob: bytes) -> str:
    with pytest.raises(ValueError) as info:
        unpack_artifact(blob)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_truncated_artifacts_are_refused(artifact):
    blob = artifact[3]
    for cut in (0, 5, 8, 9, 17, 18, 49, len(blob) // 2, len(blob) - 1):
        message = one_line_error(blob[:cut])
        assert re.search(r"truncated|bad magic", message), (cut, message)
    assert "truncated" in one_line_error(blob + b"\0")


def test_corrupted_artifacts_are_refused(artifact):
    blob = bytearray(artifact[3])
    for position in (20, len(blob) // 2, len(blob) - 40, len(blob) - 1):
        damaged = bytearray(blob)
        damaged[position] ^= 0x01
        assert "sha256 mismatch" in one_line_error(bytes(damaged))


def test_wrong_magic_torch_save_and_pickle_files_are_refused(artifact, tmp_path):
    cfg, model, *_ = artifact
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert "torch.save/pickle" in one_line_error(buffer.getvalue())
    assert "torch.save/pickle" in one_line_error(pickle.dumps({"w": [1, 2, 3]}))
    assert "bad magic" in one_line_error(b"PGQZ\r\n\x1a\x00" + artifact[3][8:])
    assert "bad magic" in one_line_error(b"")


def test_other_versions_are_refused(artifact):
    blob = bytearray(artifact[3])
    blob[8] = train_gpt.ARTIFACT_VERSION + 1
    assert f"format version {train_gpt.ARTIFACT_VERSION + 1}" in one_line_error(bytes(blob))


def test_a_crafted_file_with_a_valid_checksum_is_still_refused_cleanly(artifact):
    """Past the checksum only a deliberately built file can be wrong: it must fail as a ValueError, not crash."""
    import hashlib
    blob = artifact[3]
    head = train_gpt.ARTIFACT_HEAD
    for body in (b"not compressed", train_gpt.CODECS["zstd"][0](b"\x05\x00\x00\x00{}")):
        crafted = head.pack(train_gpt.ARTIFACT_MAGIC, train_gpt.ARTIFACT_VERSION, 0, len(body)) + body
        assert "malformed artifact" in one_line_error(crafted + hashlib.sha256(crafted).digest())
    assert blob  # the fixture's file itself is fine


def test_wrong_config_is_refused_and_unset_knobs_follow_the_artifact(artifact):
    cfg, _, _, blob, _ = artifact
    header, _ = unpack_artifact(blob)
    other = Config()  # model_dim 880, vocab 1024, ...
    adopted = artifact_config(other, header, {})
    assert (adopted.model_dim, adopted.vocab_size, adopted.num_heads) == (cfg.model_dim, cfg.vocab_size, 4)
    with pytest.raises(ValueError, match=r"artifact has MODEL_DIM=32, the environment sets 880"):
        artifact_config(other, header, {"MODEL_DIM": "880"})
    assert artifact_config(cfg, header, {"MODEL_DIM": "32"}) == cfg


# --- size accounting and knobs ---


def test_budget_line_counts_decimal_bytes():
    line, excess = budget_line("artifact", 70_000, BUDGET_BYTES - 70_000)
    assert line == ("artifact code_bytes:70000 model_bytes:15930000 total_bytes:16000000 budget_bytes:16000000 "
                    "headroom_bytes:0") and excess == 0  # exactly at the cap is allowed
    line, excess = budget_line("artifact", 70_000, BUDGET_BYTES - 69_999)
    assert line.endswith("headroom_bytes:-1") and excess == 1
    assert BUDGET_BYTES == 16_000_000  # decimal, not 16 MiB


def test_size_estimate_is_in_the_right_range():
    cfg = Config()
    estimate = train_gpt.estimate_model_bytes(cfg, train_gpt.meta_model(cfg))
    assert 12_000_000 < estimate < 16_000_000  # #1453's real artifacts: 15.3-15.4 MB at these settings


@pytest.mark.parametrize("env, message", [
    ({"QUANT_METHOD": "awq"}, "QUANT_METHOD must be one of gptq, clip, ref"),
    ({"GPTQ_CALIB": "val"}, "GPTQ_CALIB must be one of train, selfgen"),
    ({"COMPRESSOR": "lzma"}, "COMPRESSOR must be one of auto, zstd, brotli"),
    ({"GPTQ_CALIB_BATCHES": "0"}, "GPTQ_CALIB_BATCHES must be > 0"),
    ({"GPTQ_RESERVE_SECONDS": "-1"}, "GPTQ_RESERVE_SECONDS must be a finite number >= 0"),
    ({"GPTQ_RESERVE_SECONDS": "600"}, "GPTQ_RESERVE_SECONDS=600.0 must be below MAX_WALLCLOCK_SECONDS=600.0"),
])
def test_quantization_knobs_are_validated(env, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config.from_env(env)


def test_the_reserve_only_applies_to_gptq_on_train_data():
    assert Config().reserves_calibration_time
    for env in ({"QUANT_METHOD": "clip"}, {"GPTQ_CALIB": "selfgen"}, {"MAX_WALLCLOCK_SECONDS": "0"}):
        cfg = Config.from_env({**env, "GPTQ_RESERVE_SECONDS": "600"} if "MAX" not in str(env) else env)
        assert not cfg.reserves_calibration_time


def test_stored_tensor_float_values_roundtrip_through_fp16():
    t = StoredTensor("x", (2, 3), "float32", "fp16", 0, np.arange(6, dtype="<f2"))
    assert torch.equal(t.dequantize(), torch.arange(6, dtype=torch.float32).view(2, 3))


# --- bit allocation by Hessian-weighted rounding error (QUANT_HIGH_TENSORS) ---


def linear_names(model) -> list[str]:
    return sorted(f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))


def synthetic_hessians(model, big: dict[str, float]) -> dict[str, torch.Tensor]:
    """x I for every nn.Linear (1 unless named in `big`), the shapes collect_hessians gives."""
    params = dict(model.named_parameters())
    return {n: big.get(n, 1.0) * torch.eye(params[n].shape[1]) for n in linear_names(model)}


def high(levels: dict[str, int], cfg) -> set[str]:
    return {n for n, L in levels.items() if L == cfg.quant_levels and n.startswith("blocks.")}


def test_zero_high_tensors_keeps_the_table_levels(tiny_cfg):
    cfg = tiny_cfg()
    model = trained_like(cfg)
    hessians = synthetic_hessians(model, {"blocks.0.mlp.fc.weight": 1e3})
    levels = train_gpt.tensor_levels(cfg, model, hessians, forced=frozenset({"blocks.1.mlp.fc.weight"}))
    assert levels == {r.name: train_gpt.store_levels(cfg, r.rule.store) for r in param_table(model)}
    stored = quantize_model(cfg, model, hessians)[0]
    assert [t.levels for t in stored] == [train_gpt.store_levels(cfg, t.store) for t in stored]


def test_exactly_n_most_sensitive_matrices_get_the_high_levels(tiny_cfg):
    cfg = tiny_cfg(quant_high_tensors=3)
    model = trained_like(cfg)
    names = linear_names(model)
    sensitive = {"blocks.2.attn.proj.weight", "blocks.0.mlp.proj.weight", "blocks.1.attn.c_k.weight"}
    levels = train_gpt.tensor_levels(cfg, model, synthetic_hessians(model, dict.fromkeys(sensitive, 1e3)))
    assert high(levels, cfg) == sensitive
    assert all(levels[n] == cfg.mlp_quant_levels for n in set(names) - sensitive)
    assert levels["tok_emb.weight"] == cfg.quant_levels  # no Hessian: the table's level
    assert all(levels[r.name] == 0 for r in param_table(model) if r.rule.store in ("fp16", "fp32"))
    forced = frozenset({"blocks.2.mlp.fc.weight"})  # forced names come first and count toward N
    levels = train_gpt.tensor_levels(cfg, model, synthetic_hessians(model, dict.fromkeys(sensitive, 1e3)), forced)
    assert len(high(levels, cfg)) == 3 and forced < high(levels, cfg) and high(levels, cfg) - forced < sensitive
    many = frozenset(names[:5])  # more forced names than N: the N most sensitive of them
    levels = train_gpt.tensor_levels(dataclasses.replace(cfg, quant_high_tensors=2), model,
                                     synthetic_hessians(model, {names[3]: 1e3, names[1]: 1e2}), many)
    assert high(levels, cfg) == {names[3], names[1]}


def test_sensitivity_is_output_error_not_trace_and_ties_go_by_name(tiny_cfg):
    cfg = tiny_cfg(quant_high_tensors=1)
    model = trained_like(cfg)
    q, k, v = (f"blocks.0.attn.{c}.weight" for c in ("c_q", "c_k", "c_v"))
    params = dict(model.named_parameters())
    with torch.no_grad():  # Q/K/V share one H (#1204's tie, broken by dict order): the larger V weights matter more
        params[v].mul_(2)
    assert high(train_gpt.tensor_levels(cfg, model, synthetic_hessians(model, dict.fromkeys((q, k, v), 1e3))),
                cfg) == {v}
    a, b = "blocks.1.attn.c_q.weight", "blocks.2.attn.c_q.weight"
    for small, large in ((a, b), (b, a)):  # the same layer with inputs x2 and weights /2: equal error, a by name
        with torch.no_grad():
            params[small].copy_(params[large] / 2)
        hessians = synthetic_hessians(model, {large: 1e3, small: 4e3})  # trace(H) alone would pick `small`
        assert high(train_gpt.tensor_levels(cfg, model, hessians), cfg) == {a}


def test_mixed_levels_roundtrip_through_the_artifact(tiny_cfg):
    cfg = tiny_cfg(quant_high_tensors=4)
    model = trained_like(cfg)
    hessians = synthetic_hessians(model, {"blocks.1.mlp.proj.weight": 1e3, "blocks.0.attn.c_v.weight": 1e3})
    forced = frozenset({"blocks.2.mlp.fc.weight"})
    levels = train_gpt.tensor_levels(cfg, model, hessians, forced)
    stored, fallbacks = quantize_model(cfg, model, hessians, forced)
    assert fallbacks == 0 and len(high(levels, cfg)) == 4 and forced <= high(levels, cfg)
    _, loaded = unpack_artifact(pack_artifact(cfg, stored)[0])
    assert [(t.name, t.levels) for t in loaded] == [(t.name, levels[t.name]) for t in stored]
    for t_mem, t_file in zip(stored, loaded):
        assert torch.equal(t_file.dequantize(), t_mem.dequantize())
        if t_file.levels:
            assert np.abs(t_file.values).max() <= t_file.levels
    assert {t.levels for t in loaded if t.name in hessians} == {cfg.quant_levels, cfg.mlp_quant_levels}


def test_size_estimate_with_hessian_ranked_levels_grows_with_n_up_to_all_high():
    cfg = Config(quant_method="gptq")
    n = sum(r.rule.group == "muon" for r in param_table(train_gpt.meta_model(cfg)))

    def estimate(**knobs) -> int:
        return train_gpt.estimate_model_bytes(dataclasses.replace(cfg, **knobs), train_gpt.meta_model(cfg))

    sizes = [estimate(quant_high_tensors=k) for k in (1, n // 2, n)]
    assert sizes[0] < sizes[1] < sizes[2] == estimate(mlp_quant_levels=63)  # all high: every matrix at QUANT_LEVELS
