"""Section 7 (MODEL): parameter count, shapes, depth, zero-init, XSA, RoPE, causality, dtypes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt
from train_gpt import GPT, Config


def spec_param_count(cfg: Config) -> int:
    """Spec section 4.3, with the 3.V.d term generalised to (1 + n_ve).V.d for NUM_VALUE_EMBEDS = n_ve."""
    V, d, L, R, H = cfg.vocab_size, cfg.model_dim, cfg.num_layers, cfg.num_repeats, cfg.num_heads
    D, n_ve = L * R, cfg.num_value_embeds
    kv_dim = cfg.num_kv_heads * (d // H)
    hidden = int(cfg.mlp_mult * d)  # = mlp.d for integer multiples
    per_block = 2 * d * d + 2 * d * kv_dim + 2 * hidden * d + H + 4 * d
    return (1 + n_ve) * V * d + D * d * (n_ve + 1) + L * (R - 1) * d + L * per_block


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(cfg: Config) -> GPT:
    with torch.device("meta"):
        return GPT(cfg)


@torch.no_grad()
def randomize(model: GPT, seed: int = 0, std: float = 0.2) -> GPT:
    """Give the zero-initialised tensors (output projections, recurrence scalars) random values."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if not p.any():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def make_model(tiny_cfg, seed: int = 0, random: bool = True, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(tiny_cfg(**overrides))
    return randomize(model, seed) if random else model


def random_ids(cfg: Config, batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, cfg.train_seq_len), generator=gen)


# --- parameter count ---


def test_default_config_parameter_count():
    cfg = Config()
    assert n_params(meta_model(cfg)) == spec_param_count(cfg) == 23_662_344


def test_four_hour_config_parameter_count():
    cfg = Config(model_dim=832, mlp_mult=2.0, num_repeats=5, prog_depth="0.3:2,0.5:3,0.75:4,1.0:5")
    assert n_params(meta_model(cfg)) == spec_param_count(cfg) == 17_150_040


@pytest.mark.parametrize("overrides", [
    {},
    {"num_value_embeds": 0},
    {"num_value_embeds": 1},
    {"num_value_embeds": 3},
    {"num_repeats": 1, "prog_depth": "1.0:1"},
    {"num_layers": 2, "num_repeats": 5, "prog_depth": "0.5:3,1.0:5"},
    {"num_kv_heads": 4},
    {"num_kv_heads": 1, "mlp_mult": 2.5},
    {"model_dim": 48, "num_heads": 6, "num_kv_heads": 3, "vocab_size": 100},
])
def test_parameter_count_formula(tiny_cfg, overrides):
    cfg = tiny_cfg(**overrides)
    assert n_params(meta_model(cfg)) == spec_param_count(cfg)


def test_spec_shapes_of_the_default_model():
    model = meta_model(Config())
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["tok_emb.weight"] == (1024, 880)
    assert shapes["value_embeds.1.weight"] == (1024, 880)
    assert shapes["value_scales"] == (12, 2, 880)
    assert shapes["loop_embed"] == (12, 880)
    assert shapes["cross_repeat_scales"] == (3, 3, 880)
    assert shapes["blocks.2.attn.c_k.weight"] == (440, 880)
    assert shapes["blocks.0.mlp.fc.weight"] == (2640, 880)
    assert shapes["blocks.0.mlp.proj.weight"] == (880, 2640)
    assert shapes["q_gain"] == (3, 8)  # per block, shared by its repeats (UNTIE_SCALARS=0)
    assert shapes["resid_mix"] == (3, 2, 880)


# --- forward / backward ---


def test_forward_shapes_and_dtypes(tiny_cfg):
    model = make_model(tiny_cfg)
    cfg = model.cfg
    ids = random_ids(cfg, batch=3)
    logits = model(ids, cfg.num_repeats)
    assert logits.shape == (3, cfg.train_seq_len, cfg.vocab_size) and logits.dtype == torch.float32
    assert logits.abs().max() <= cfg.logit_softcap
    nll = model(ids, cfg.num_repeats, ids)
    assert nll.shape == (3, cfg.train_seq_len) and nll.dtype == torch.float32
    # The per-token NLL is the cross entropy of those logits.
    expected = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view_as(ids)
    torch.testing.assert_close(nll, expected)


def test_forward_shapes_under_autocast(tiny_cfg):
    model = make_model(tiny_cfg)
    ids = random_ids(model.cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids, 2)
        nll = model(ids, 2, ids)
    assert logits.dtype == torch.float32 and nll.dtype == torch.float32  # fp32 head even under autocast


@pytest.mark.parametrize("repeats", [1, 2, 3, 4])
def test_backward_at_every_depth(tiny_cfg, repeats):
    model = make_model(tiny_cfg)
    cfg = model.cfg
    ids = random_ids(cfg)
    model(ids, repeats, torch.roll(ids, -1, 1)).mean().backward()
    for name, p in model.named_parameters():
        if name == "cross_repeat_scales" and repeats == 1:
            assert p.grad is None  # not in the graph at one repeat (optimizers and clipping skip it)
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    active = cfg.num_layers * repeats
    loop_grad = model.loop_embed.grad
    assert (loop_grad[:active].abs().sum(-1) > 0).all()  # every active layer trains
    assert (loop_grad[active:] == 0).all()  # layers past the current depth get nothing
    assert (model.value_scales.grad[active:] == 0).all()
    assert (model.value_scales.grad[:active].abs().sum((-1, -2)) > 0).all()
    cross = model.cross_repeat_scales.grad  # (L, R-1, d): entry r-1 is used by repeat r
    if repeats == 1:
        return
    assert (cross[:, repeats - 1:] == 0).all()
    assert (cross[:, :repeats - 1].abs().sum(-1) > 0).all()


def test_depth_changes_the_output(tiny_cfg):
    model = make_model(tiny_cfg)
    ids = random_ids(model.cfg)
    outs = [model(ids, r) for r in (1, 2, 3, 4)]
    for a, b in zip(outs, outs[1:]):
        assert not torch.allclose(a, b)


def test_zero_init_step0_logits_are_the_tied_embedding(tiny_cfg):
    model = make_model(tiny_cfg, random=False)
    cfg = model.cfg
    ids = random_ids(cfg)
    emb = model.tok_emb.weight
    h = train_gpt.rms_norm(train_gpt.rms_norm(emb[ids]))  # x0 = norm(emb); every block is the identity
    expected = cfg.logit_softcap * torch.tanh(h @ emb.T / cfg.logit_softcap)
    with torch.no_grad():
        outs = [model(ids, r) for r in range(1, cfg.num_repeats + 1)]
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(out, outs[0])  # independent of depth, exactly


# --- XSA placement ---


@pytest.mark.parametrize("repeats, xsa_last_n, first", [
    (2, 4, 2), (3, 4, 5), (4, 4, 8), (1, 4, 0), (4, 1, 11), (4, 12, 0), (4, 20, 0), (4, 0, 12), (2, 0, 6),
])
def test_xsa_start(tiny_cfg, repeats, xsa_last_n, first):
    flags = [at.xsa for at in train_gpt.effective_layers(tiny_cfg(xsa_last_n=xsa_last_n), repeats)]
    assert flags == [False] * first + [True] * (3 * repeats - first)


@pytest.mark.parametrize("repeats, parallel_last_n, first", [(4, 4, 8), (2, 4, 2), (1, 4, 0), (4, 0, 12)])
def test_parallel_lanes_on_the_last_layers_like_xsa(tiny_cfg, repeats, parallel_last_n, first):
    """At a depth with fewer layers than PARALLEL_LAST_N, every layer runs two lanes (as XSA_LAST_N does)."""
    flags = [at.parallel for at in train_gpt.effective_layers(tiny_cfg(parallel_last_n=parallel_last_n), repeats)]
    assert flags == [False] * first + [True] * (3 * repeats - first)


@pytest.mark.parametrize("repeats, xsa_last_n, layers", [
    (2, 4, [2, 3, 4, 5]),
    (3, 4, [5, 6, 7, 8]),
    (4, 4, [8, 9, 10, 11]),
    (1, 4, [0, 1, 2]),
    (4, 0, []),
])
def test_forward_applies_xsa_only_on_the_last_layers(tiny_cfg, monkeypatch, repeats, xsa_last_n, layers):
    model = make_model(tiny_cfg, xsa_last_n=xsa_last_n)
    flags, xsa_calls = [], []
    for block in model.blocks:
        block.attn.register_forward_pre_hook(lambda mod, args: flags.append(bool(args[3])))
    real = train_gpt.remove_self_value

    def counting(y, v):
        xsa_calls.append(len(flags) - 1)  # the effective layer whose attention is running
        return real(y, v)

    monkeypatch.setattr(train_gpt, "remove_self_value", counting)
    with torch.no_grad():
        model(random_ids(model.cfg), repeats)
    assert len(flags) == 3 * repeats
    assert [i for i, f in enumerate(flags) if f] == layers
    assert xsa_calls == layers


def test_xsa_changes_the_output_only_through_remove_self_value(tiny_cfg, monkeypatch):
    ids = random_ids(tiny_cfg())
    with torch.no_grad():
        with_xsa = make_model(tiny_cfg, xsa_last_n=4)(ids, 4)
        without = make_model(tiny_cfg, xsa_last_n=0)(ids, 4)
        assert not torch.allclose(with_xsa, without)
        monkeypatch.setattr(train_gpt, "remove_self_value", lambda y, v: y)
        disabled = make_model(tiny_cfg, xsa_last_n=4)(ids, 4)
    torch.testing.assert_close(disabled, without, rtol=0, atol=0)


def test_remove_self_value_is_orthogonal_per_head_with_gqa_mapping():
    gen = torch.Generator().manual_seed(0)
    b, h, kv, t, hd = 2, 6, 2, 5, 8
    group = h // kv
    y = torch.randn(b, h, t, hd, generator=gen)
    v = torch.randn(b, kv, t, hd, generator=gen)
    out = train_gpt.remove_self_value(y, v)
    assert out.shape == y.shape
    for i in range(h):
        unit = F.normalize(v[:, i // group], dim=-1)
        # orthogonal to the own-position value direction of its kv head ...
        torch.testing.assert_close((out[:, i] * unit).sum(-1), torch.zeros(b, t), atol=1e-5, rtol=0)
        # ... and exactly y minus its projection on that direction
        expected = y[:, i] - (y[:, i] * unit).sum(-1, keepdim=True) * unit
        torch.testing.assert_close(out[:, i], expected, atol=1e-6, rtol=1e-5)
        # and not to the other kv head's direction (a wrong head mapping would fail here)
        other = F.normalize(v[:, 1 - i // group], dim=-1)
        assert (out[:, i] * other).sum(-1).abs().max() > 1e-3


def test_sdpa_gqa_uses_the_same_head_mapping_as_xsa():
    # XSA assumes query head i reads kv head i // group, as scaled_dot_product_attention's enable_gqa does.
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 6, 8, generator=gen)
    k = torch.randn(1, 2, 6, 8, generator=gen)
    v = torch.randn(1, 2, 6, 8, generator=gen)
    gqa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    manual = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(gqa, manual)


def test_remove_self_value_zero_value_is_safe():
    y = torch.randn(1, 2, 3, 4)
    out = train_gpt.remove_self_value(y, torch.zeros(1, 1, 3, 4))
    torch.testing.assert_close(out, y)


# --- RoPE ---


def test_rope_tables_fp32_and_distinct_positions():
    cos, sin = train_gpt.rope_tables(1024, 110, 10000.0, torch.device("cpu"))
    assert cos.dtype == torch.float32 and sin.dtype == torch.float32
    assert cos.shape == (1024, 55)
    assert not torch.equal(cos[256], cos[257]) and not torch.equal(sin[256], sin[257])
    # The reference's bf16 positions collapse 256 and 257 (what this guards against).
    pos = torch.arange(1024, dtype=torch.bfloat16)
    assert pos[256] == pos[257]
    # Accurate against a float64 computation (fp32 angle error at t=1023 is ~1e-4 rad).
    inv = 10000.0 ** (-torch.arange(0, 110, 2, dtype=torch.float64) / 110)
    angles = torch.arange(1024, dtype=torch.float64)[:, None] * inv[None, :]
    torch.testing.assert_close(cos.double(), angles.cos(), atol=2e-4, rtol=0)
    torch.testing.assert_close(sin.double(), angles.sin(), atol=2e-4, rtol=0)
    # All 1024 positions are distinct codes.
    assert torch.unique(torch.cat([cos, sin], 1), dim=0).shape[0] == 1024


def test_apply_rope_formula_and_norms():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 8, generator=gen)
    cos, sin = train_gpt.rope_tables(16, 8, 10000.0, torch.device("cpu"))
    out = train_gpt.apply_rope(x, cos, sin)
    x1, x2 = x[..., :4], x[..., 4:]
    torch.testing.assert_close(out, torch.cat((x1 * cos + x2 * sin, -x1 * sin + x2 * cos), -1))
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(out[..., 0, :], x[..., 0, :])  # position 0 is not rotated
    # Scores depend only on the relative position.
    q = torch.randn(8, generator=gen).expand(1, 1, 16, 8)
    k = torch.randn(8, generator=gen).expand(1, 1, 16, 8)
    rq, rk = train_gpt.apply_rope(q, cos, sin)[0, 0], train_gpt.apply_rope(k, cos, sin)[0, 0]
    torch.testing.assert_close(rq[5] @ rk[2], rq[12] @ rk[9])
    torch.testing.assert_close(rq[3] @ rk[3], rq[0] @ rk[0])


def test_apply_rope_bf16_input_keeps_dtype():
    x = torch.randn(1, 2, 8, 4).bfloat16()
    cos, sin = train_gpt.rope_tables(8, 4, 10000.0, torch.device("cpu"))
    assert train_gpt.apply_rope(x, cos, sin).dtype == torch.bfloat16


# --- MLP ---


def test_mlp_is_leaky_relu_half_squared(tiny_cfg):
    torch.manual_seed(0)
    mlp = train_gpt.MLP(tiny_cfg())
    torch.nn.init.normal_(mlp.proj.weight)
    x = torch.randn(4, 32)
    u = x @ mlp.fc.weight.T
    act = (u.clamp(min=0) + 0.5 * u.clamp(max=0)).square()
    torch.testing.assert_close(mlp(x), act @ mlp.proj.weight.T)


# --- causality ---


@pytest.mark.parametrize("t", [1, 7, 15])
def test_causality(tiny_cfg, t):
    model = make_model(tiny_cfg)
    ids = random_ids(model.cfg)
    changed = ids.clone()
    changed[:, t] = (changed[:, t] + 1) % model.cfg.vocab_size
    with torch.no_grad():  # no autocast: fp32 throughout
        a, b = model(ids, 4), model(changed, 4)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t:] - b[:, t:]).abs().amax(-1).min() > 1e-4  # every later position sees the change


# --- dtypes ---


def test_apply_param_dtypes_makes_every_parameter_fp32(tiny_cfg):
    model = make_model(tiny_cfg).to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_gpt.apply_param_dtypes(model)
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32, n
        assert torch.equal(p.detach(), before[n].float())


def test_autocast_loss_is_close_to_fp32(tiny_cfg):
    model = make_model(tiny_cfg)
    ids = random_ids(model.cfg, batch=4)
    targets = torch.roll(ids, -1, 1)
    with torch.no_grad():
        fp32 = model(ids, 4, targets).mean()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(ids, 4, targets).mean()
    assert torch.isfinite(bf16)
    assert bf16.item() != fp32.item()  # autocast really ran in bf16
    assert bf16.item() == pytest.approx(fp32.item(), rel=1e-3)
    assert fp32.item() > math.log(model.cfg.vocab_size) * 0.5  # a random model: sanity of the scale
