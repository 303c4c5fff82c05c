"""Seed presets (section 2) and the #1204/#456 model options (section 7): logged parameter counts, the layer plan,
and each option's forward/backward and defining formula on tiny configs."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import train_gpt
from conftest import REPO, tiny_config
from train_gpt import GPT, Config, ConfigError, layer_plan, param_table

# The counts each system logged (reference-1453.md 4.3 and 15.2; reference-1204-456.md A3 and B3).
LOGGED_PARAMS = {"pr1453": 23_662_344, "pr895": 17_150_040, "pr784": 17_140_056, "pr1204": 30_352_046,
                 "pr456": 25_517_137}

# Tiny versions of the two seed architectures; everything else from tiny_config (d=32, 4 heads, 2 kv heads).
TINY_1204 = dict(num_layers=5, num_repeats=2, recur_layers="2,3", prog_depth="0.5:1,1.0:2", num_value_embeds=0,
                 loop_embed=False, cross_repeat=False, untie_scalars=True, untie_repeat_mlp=True, unet="gated",
                 parallel_last_n=2, bigram_vocab_size=64, bigram_dim=16, smear_gate=True, rope_dims=4, ln_scale=True,
                 ve_dim=8, ve_layers="4,5", disable_layer0_attn=True, xsa_last_n=5)
TINY_456 = dict(num_layers=4, num_repeats=1, prog_depth="1.0:1", num_value_embeds=0, loop_embed=False, unet="add",
                bigram_vocab_size=64, bigram_dim=16, smear_gate=True, mlp_negative_slope=0.0, xsa_last_n=2)


def dry_run(preset: str) -> str:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "PYTHONPATH")}
    out = subprocess.run([sys.executable, str(REPO / "train_gpt.py")], env={**env, "DRY_RUN": "1", "PRESET": preset},
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout


@pytest.mark.parametrize("preset", sorted(LOGGED_PARAMS))
def test_dry_run_of_each_seed_preset_prints_its_logged_parameter_count(preset):
    assert f"\nmodel_params:{LOGGED_PARAMS[preset]}\n" in dry_run(preset)


def test_pr1204_breakdown_matches_the_spec_table():
    cfg = Config.from_env({"PRESET": "pr1204"})
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in GPT(cfg).named_parameters()}
    assert shapes["bigram.embed.weight"] == (2816, 160) and shapes["bigram.proj.weight"] == (512, 160)
    assert shapes["repeat_mlps.1.fc.weight"] == (1536, 512) and len([n for n in shapes if "repeat_mlps" in n]) == 4
    assert shapes["q_gain"] == (13, 8) and shapes["resid_mix"] == (13, 2, 512)  # one set per effective layer
    assert shapes["skip_weights"] == shapes["skip_gates"] == (6, 512)
    assert shapes["lane_post"] == (11, 2, 2) and shapes["lane_resid"] == (11, 2)
    assert shapes["v_embed.embed.weight"] == (1024, 128) and shapes["v_embed.proj.weight"] == (256, 128)
    assert shapes["v_embed.layer_scales"] == (2,)


def test_pr1204_forces_its_16_recurrent_matrices_to_the_high_levels_first():
    with torch.device("meta"):
        model = GPT(Config.from_env({"PRESET": "pr1204"}))
    names = model.recurrent_matrices()
    assert len(names) == 16 and all(n.startswith(("blocks.4.", "blocks.5.", "repeat_mlps.")) for n in names)
    assert model.unexported() == {f"blocks.0.attn.{m}.weight" for m in ("c_q", "c_k", "c_v", "proj")}


def test_presets_are_valid_and_differ_only_where_the_systems_did():
    pr456 = Config.from_env({"PRESET": "pr456"})
    assert (pr456.num_layers, pr456.num_repeats, pr456.mlp_negative_slope, pr456.eval_stride) == (10, 1, 0.0, 128)
    assert pr456.ttt and pr456.ttt_chunk_tokens == 32768 and pr456.ttt_lr == 5e-4  # its score-first TTT
    assert Config.from_env({"PRESET": "pr784"}).depth_schedule == ((1.0, 4),)  # no progressive depth
    assert Config.from_env({"PRESET": "pr895"}).quant_levels == 127
    with pytest.raises(ConfigError, match="unknown PRESET"):
        Config.from_env({"PRESET": "pr9999"})


# --- the layer plan ---


def test_layer_plan_of_the_1204_mini_recurrence():
    cfg = Config.from_env({"PRESET": "pr1204"})
    full = layer_plan(cfg, 2)
    assert [p for p, _, _ in full] == [0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 10]
    assert [s for _, s, _ in full] == list(range(13))
    assert [k for _, _, k in full] == [0] * 6 + [1, 1] + [0] * 5
    # Before activation every layer keeps the slot it has at full depth (no re-pairing of per-layer parameters).
    assert layer_plan(cfg, 1) == [(p, p if p < 6 else p + 2, 0) for p in range(11)]


def test_layer_plan_of_the_whole_stack_recurrence_is_the_1453_loop():
    cfg = Config()
    assert layer_plan(cfg, 3) == [(j, r * 3 + j, r) for r in range(3) for j in range(3)]


@pytest.mark.parametrize("env, message", [
    ({"RECUR_LAYERS": "1,3", "NUM_LAYERS": "4"}, "RECUR_LAYERS must be consecutive"),
    ({"RECUR_LAYERS": "2,3"}, "RECUR_LAYERS must be consecutive layers in 0..2"),
    ({"RECUR_LAYERS": "a"}, "comma-separated integers"),
    ({"UNET": "sum"}, "UNET must be one of off, add, gated"),
    ({"BIGRAM_VOCAB_SIZE": "1"}, "BIGRAM_VOCAB_SIZE must be 0"),
    ({"ROPE_DIMS": "3"}, "ROPE_DIMS must be even"),
    ({"ROPE_DIMS": "112"}, "ROPE_DIMS must be even and <= the head dim 110"),
    ({"PARALLEL_LAST_N": "13"}, "PARALLEL_LAST_N=13 exceeds the 12 effective layers"),
    ({"VE_DIM": "8"}, "VE_DIM > 0 needs VE_LAYERS"),
    ({"VE_LAYERS": "1"}, "VE_LAYERS needs VE_DIM > 0"),
    ({"VE_DIM": "8", "VE_LAYERS": "12"}, "effective layers in 0..11"),
    ({"MLP_NEGATIVE_SLOPE": "-1"}, "MLP_NEGATIVE_SLOPE must be a finite number >= 0"),
])
def test_bad_architecture_knobs_are_refused(env, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_env(env)


# --- forward / backward of every option ---


def build(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides))


def ids_for(model: GPT, batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size, (batch, model.cfg.train_seq_len), generator=gen)


@pytest.mark.parametrize("shape", [TINY_1204, TINY_456], ids=["1204", "456"])
def test_seed_shaped_models_train_every_parameter_they_use(shape):
    model = build(**shape)
    param_table(model)  # every new parameter has exactly one rule
    for repeats in sorted({r for _, r in model.cfg.depth_schedule}):
        model.zero_grad(set_to_none=True)
        ids = ids_for(model)
        nll = model(ids, repeats, torch.roll(ids, -1, 1))
        assert nll.shape == ids.shape and torch.isfinite(nll).all()
        nll.mean().backward()
    unused = {n for n, p in model.named_parameters() if p.grad is None}
    assert unused == model.unexported()  # only the disabled layer-0 attention (1204) gets no gradient


@pytest.mark.parametrize("option", [
    dict(unet="add"), dict(unet="gated"), dict(parallel_last_n=3), dict(bigram_vocab_size=64, bigram_dim=16),
    dict(smear_gate=True), dict(rope_dims=4), dict(ln_scale=True), dict(ve_dim=8, ve_layers="1,11"),
    dict(untie_scalars=True), dict(mlp_negative_slope=0.0), dict(recur_layers="1", num_layers=3),
    dict(disable_layer0_attn=True),
])
def test_each_option_runs_forward_backward_on_the_1453_shape(option):
    model = build(**option)
    ids = ids_for(model)
    model(ids, 4, ids).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    assert {n for n, g in grads.items() if g is None} == model.unexported()


def test_untied_repeat_mlps_are_cloned_at_activation_so_the_switch_changes_nothing():
    model = build(**TINY_1204)
    with torch.no_grad():
        for p in model.parameters():  # make every tensor non-trivial, then let the repeat MLPs drift
            p.add_(torch.randn_like(p) * 0.1)
    ids = ids_for(model)
    tied_out = model(ids, 1)
    model.clone_repeat_mlps(1, 2)
    for j, mlp in enumerate(model.repeat_mlps):
        torch.testing.assert_close(mlp.fc.weight, model.blocks[2 + j].mlp.fc.weight, rtol=0, atol=0)
    with torch.no_grad():  # with clones, the repeat MLPs act exactly as the shared ones would
        untied = model(ids, 2)
        model.repeat_mlps = None
        torch.testing.assert_close(untied, model(ids, 2), rtol=0, atol=0)
    assert not torch.equal(tied_out, untied)


def test_bigram_hash_buckets_and_zero_start():
    model = build(bigram_vocab_size=64, bigram_dim=16)
    ids = torch.tensor([[3, 7, 7, 0]])
    buckets = []
    model.bigram.embed.register_forward_hook(lambda m, args, out: buckets.append(args[0]))
    out = model.bigram(ids)
    expected = [63] + [((36313 * c) ^ (27191 * p)) % 63 for p, c in zip([3, 7, 7], [7, 7, 0])]
    assert buckets[0].tolist() == [expected]
    assert not out.any()  # zero table: a no-op until it trains
    ids = ids_for(model)
    model(ids, 4, ids).mean().backward()
    assert model.bigram.embed.weight.grad.abs().sum() > 0  # unlike #1453's, it trains


def test_smear_gate_blends_each_position_with_its_predecessor():
    model = build(smear_gate=True)
    with torch.no_grad():
        model.smear_gate.fill_(math.log(3))  # sigmoid = 3/4
    ids = ids_for(model, batch=1)
    e = train_gpt.rms_norm(model.tok_emb(ids))
    expected = 0.25 * e + 0.75 * F.pad(e[:, :-1], (0, 0, 1, 0))
    torch.testing.assert_close(model.embed(ids), expected)


def test_partial_rope_leaves_the_unrotated_dims_alone():
    x = torch.randn(1, 2, 5, 8)
    cos, sin = train_gpt.rope_tables(5, 4, 10000.0, torch.device("cpu"))
    y = train_gpt.apply_rope(x, cos, sin)
    assert torch.equal(y[..., 4:], x[..., 4:])
    assert torch.equal(y[:, :, 0], x[:, :, 0]) and not torch.allclose(y[:, :, 1:, :4], x[:, :, 1:, :4])
    torch.testing.assert_close(y[..., :4].norm(dim=-1), x[..., :4].norm(dim=-1))  # a rotation


def test_value_embedding_reaches_only_the_chosen_layers():
    model = build(ve_dim=8, ve_layers="5")
    seen = []
    for block in model.blocks:
        block.attn.register_forward_pre_hook(lambda m, args: seen.append(args[4] is not None))
    with torch.no_grad():
        model(ids_for(model), 4)
    assert seen == [i == 5 for i in range(12)]


@torch.no_grad()
def test_parallel_lanes_follow_the_1204_routing_formula():
    """attention reads lane 0 and writes both lanes with post[0]; the MLP reads lane 1 (after attention wrote it)
    and writes both with post[1]; each sublayer first scales both lanes by its residual weight."""
    model = build(parallel_last_n=1, num_repeats=1, prog_depth="1.0:1")
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.1)
    model.lane_post[2] = torch.tensor([[1.0, 0.3], [0.2, 0.9]])
    model.lane_resid[2] = torch.tensor([1.1, 0.8])
    ids = ids_for(model)
    x0 = model.embed(ids)
    l0, l1 = x0 + 0.1, x0 - 0.1
    rope = train_gpt.rope_tables(ids.size(1), model.cfg.head_dim, 10000.0, ids.device)
    at = dataclasses.replace(model.plans[1][2], xsa=False)
    got0, got1 = model.parallel_layer([l0, l1], x0, at, rope)
    mix, block, norm = model.resid_mix[2], model.blocks[2], train_gpt.rms_norm
    a = model.attn_scale[2] * block.attn(norm(mix[0] * l0 + mix[1] * x0), rope, model.q_gain[2], False)
    l0, l1 = 1.1 * l0 + 1.0 * a, 1.1 * l1 + 0.3 * a
    m = model.mlp_scale[2] * block.mlp(norm(mix[0] * l1 + mix[1] * x0))
    torch.testing.assert_close(got0, 0.8 * l0 + 0.2 * m)
    torch.testing.assert_close(got1, 0.8 * l1 + 0.9 * m)


@pytest.mark.parametrize("unet", ["add", "gated"])
def test_unet_skips_pair_mirrored_layers(unet):
    """Decoder layer E+i reads encoder layer E-1-i: added with skip_weights[i] (#456), or (1-g) w skip + g x (#1204)."""
    model = build(unet=unet, num_layers=4, num_repeats=1, prog_depth="1.0:1", loop_embed=False)
    ins, outs, real_layer = [], [], model.layer

    def spy(x, *rest):
        ins.append(x)
        outs.append(real_layer(x, *rest))
        return outs[-1]

    model.layer = spy
    with torch.no_grad():
        model.skip_weights.copy_(torch.tensor([[2.0], [3.0]]).expand(2, 32))
        if unet == "gated":
            model.skip_gates.fill_(math.log(3))  # g = 3/4
        model(ids_for(model), 1)
    if unet == "add":
        torch.testing.assert_close(ins[2], outs[1] + 2 * outs[1])
        torch.testing.assert_close(ins[3], outs[2] + 3 * outs[0])
    else:
        torch.testing.assert_close(ins[2], 0.25 * 2 * outs[1] + 0.75 * outs[1])
        torch.testing.assert_close(ins[3], 0.25 * 3 * outs[0] + 0.75 * outs[2])


def test_disabled_layer0_attention_is_left_out_of_the_artifact_and_filled_on_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Runtime writes logs/ in the working directory
    cfg = tiny_config(disable_layer0_attn=True, quant_method="clip")
    torch.manual_seed(0)
    model = GPT(cfg)
    stored, _ = train_gpt.quantize_model(cfg, model, {})
    names = {t.name for t in stored}
    assert names.isdisjoint(model.unexported()) and "blocks.1.attn.c_q.weight" in names
    blob, _ = train_gpt.pack_artifact(cfg, stored)
    header, back = train_gpt.unpack_artifact(blob)
    state = {t.name: t.dequantize() for t in back}
    rt = train_gpt.Runtime(dataclasses.replace(cfg, device="cpu", autocast="0"), {})
    tokens = torch.randint(0, cfg.vocab_size, (200,))
    tables = train_gpt.ByteTables(*(torch.ones(cfg.vocab_size, dtype=t) for t in (torch.int32, torch.bool,
                                                                                   torch.bool)))
    loaded, _, bpb = train_gpt.roundtrip_eval(cfg, rt, state, tokens, tables)
    assert math.isfinite(bpb) and not loaded.blocks[0].attn.c_q.weight.any()


# --- whole runs of the seed shapes ---

RUN_1204 = dict(NUM_LAYERS="5", NUM_REPEATS="2", RECUR_LAYERS="2,3", PROG_DEPTH="0.5:1,1.0:2", NUM_VALUE_EMBEDS="0",
                LOOP_EMBED="0", CROSS_REPEAT="0", UNTIE_SCALARS="1", UNTIE_REPEAT_MLP="1", UNET="gated",
                PARALLEL_LAST_N="2", BIGRAM_VOCAB_SIZE="64", BIGRAM_DIM="16", SMEAR_GATE="1", ROPE_DIMS="4",
                LN_SCALE="1", VE_DIM="8", VE_LAYERS="4,5", DISABLE_LAYER0_ATTN="1", XSA_LAST_N="5", SWA_ENABLED="0",
                EMA_DECAY="0.9", QUANT_LEVELS="31", MLP_QUANT_LEVELS="15", QUANT_HIGH_TENSORS="12")
RUN_456 = dict(NUM_LAYERS="4", NUM_REPEATS="1", PROG_DEPTH="1.0:1", NUM_VALUE_EMBEDS="0", LOOP_EMBED="0", UNET="add",
               BIGRAM_VOCAB_SIZE="64", BIGRAM_DIM="16", SMEAR_GATE="1", MLP_NEGATIVE_SLOPE="0", XSA_LAST_N="2",
               QUANT_LEVELS="31", MLP_QUANT_LEVELS="15", QUANT_METHOD="clip", MIXER="off", TTT="1",
               TTT_CHUNK_TOKENS="512")


@pytest.mark.parametrize("shape", [RUN_1204, RUN_456], ids=["1204", "456"])
def test_seed_shaped_runs_train_export_and_evaluate(tmp_path, demo_subset, shape):
    from test_main import SCRIPT, read_log, run, tiny_env
    out = run([sys.executable, SCRIPT], tiny_env(demo_subset, **shape), tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    _, records = read_log(tmp_path)
    names = [r["name"] for r in records]
    assert names[-3:] == (["final_roundtrip", "final_sliding_window", "final_ttt"] if shape is RUN_456 else
                          ["final_roundtrip", "final_sliding_window", "final_mixer"])
    assert all(math.isfinite(r["val_bpb"]) for r in records)
    if shape is RUN_1204:  # recurrence switched on mid-run; 12 of 32 GPTQ matrices (26 block, 4 repeat MLP,
        # bigram and V-embedding projections; layer 0's attention has no Hessian) keep the high levels
        assert "prog_depth:switch repeats:2 step:6 " in out.stdout
        assert "ema:apply decay:0.9" in out.stdout and "quant_levels high:12 low:20" in out.stdout
