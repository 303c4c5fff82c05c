"""Section 8 (PARAMETERS): the parameter policy table, the optimizers built from it, Muon's update."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest
import torch
from torch import nn

import train_gpt
from train_gpt import GPT, Config, ParamRule, build_optimizers, param_table

BLOCK_MATRICES = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")

CONFIGS = [
    {},
    {"num_value_embeds": 0},
    {"num_value_embeds": 1},
    {"num_value_embeds": 3},
    {"num_repeats": 1, "prog_depth": "1.0:1"},
    {"num_layers": 5, "num_repeats": 2, "prog_depth": "0.5:1,1.0:2"},
]


def meta_model(cfg: Config) -> GPT:
    with torch.device("meta"):
        return GPT(cfg)


@pytest.fixture
def tiny_model(tiny_cfg):
    torch.manual_seed(0)
    return GPT(tiny_cfg())


# --- the table ---


@pytest.mark.parametrize("overrides", CONFIGS)
def test_param_table_covers_every_parameter_once(tiny_cfg, overrides):
    model = meta_model(tiny_cfg(**overrides))
    rows = param_table(model)
    names = [n for n, _ in model.named_parameters()]
    assert [r.name for r in rows] == names
    assert len(set(names)) == len(names)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert all(r.shape == shapes[r.name] for r in rows)
    for r in rows:  # each matched rule really matches, and no other does
        assert [rule for rule in train_gpt.PARAM_RULES if re.fullmatch(rule.pattern, r.name)] == [r.rule]


def test_param_table_on_the_default_model():
    rows = param_table(meta_model(Config()))
    assert len(rows) == 1 + 2 + 3 + 4 + 3 * 6  # tok_emb, 2 value tables, 3 recurrence tensors, 4 scalars, 6 per block


@pytest.mark.parametrize("overrides", CONFIGS)
def test_groups(tiny_cfg, overrides):
    cfg = tiny_cfg(**overrides)
    rows = param_table(meta_model(cfg))
    by_group = {g: {r.name for r in rows if r.rule.group == g} for g in ("muon", "embed", "scalar")}
    assert by_group["muon"] == {f"blocks.{i}.{m}.weight" for i in range(cfg.num_layers) for m in BLOCK_MATRICES}
    assert by_group["embed"] == {"tok_emb.weight"} | {f"value_embeds.{k}.weight"
                                                       for k in range(cfg.num_value_embeds)}
    scalars = {"loop_embed", "q_gain", "attn_scale", "mlp_scale", "resid_mix"} | (
        {"value_scales"} if cfg.num_value_embeds else set()) | ({"cross_repeat_scales"} if cfg.num_repeats > 1 else set())
    assert by_group["scalar"] == scalars
    assert sum(map(len, by_group.values())) == len(rows)


def test_dtypes_and_storage_policy():
    rows = {r.name: r.rule for r in param_table(meta_model(Config()))}
    assert all(rule.dtype == torch.float32 for rule in rows.values())
    store = {name: rule.store for name, rule in rows.items()}
    assert store["tok_emb.weight"] == store["value_embeds.0.weight"] == "q_attn"
    assert store["blocks.0.attn.c_q.weight"] == store["blocks.2.attn.proj.weight"] == "q_attn"
    assert store["blocks.1.mlp.fc.weight"] == store["blocks.1.mlp.proj.weight"] == "q_mlp"
    assert store["q_gain"] == store["resid_mix"] == "fp32"
    assert store["loop_embed"] == store["value_scales"] == store["cross_repeat_scales"] == "fp16"


def test_parameter_matching_no_rule_raises(tiny_model):
    tiny_model.extra_gate = nn.Parameter(torch.zeros(3))
    with pytest.raises(AssertionError, match="extra_gate"):
        param_table(tiny_model)
    with pytest.raises(AssertionError, match="extra_gate"):
        build_optimizers(tiny_model, tiny_model.cfg, fused=False)  # fails at build time, not silently


def test_nested_parameter_matching_no_rule_raises(tiny_model):
    tiny_model.blocks[1].attn.k_gain = nn.Parameter(torch.ones(2))
    with pytest.raises(AssertionError, match=r"blocks\.1\.attn\.k_gain"):
        param_table(tiny_model)


def test_parameter_matching_two_rules_raises(tiny_model, monkeypatch):
    rules = train_gpt.PARAM_RULES + (ParamRule(r"loop_embed", "embed", torch.float32, "fp16"),)
    monkeypatch.setattr(train_gpt, "PARAM_RULES", rules)
    with pytest.raises(AssertionError, match=r"loop_embed matches 2"):
        param_table(tiny_model)


def test_store_label():
    cfg = Config()
    assert train_gpt.store_label(cfg, "q_attn") == "q(levels=63,bits=6.99)"
    assert train_gpt.store_label(cfg, "q_mlp") == "q(levels=16,bits=5.04)"
    assert train_gpt.store_label(cfg, "fp16") == "fp16"
    assert train_gpt.store_label(cfg, "fp32") == "fp32"
    assert train_gpt.store_label(Config(quant_levels=127), "q_attn") == "q(levels=127,bits=7.99)"


def test_describe_params_lists_every_parameter(tiny_cfg):
    cfg = tiny_cfg()
    model = meta_model(cfg)
    lines = train_gpt.describe_params(cfg, model)
    assert lines[0] == f"model_params:{sum(p.numel() for p in model.parameters())}"
    names = [re.match(r"param name:(\S+) ", line).group(1) for line in lines[1:]]
    assert names == [n for n, _ in model.named_parameters()]


# --- optimizers ---


@pytest.mark.parametrize("overrides", CONFIGS)
def test_every_parameter_in_exactly_one_optimizer(tiny_cfg, overrides):
    torch.manual_seed(0)
    model = GPT(tiny_cfg(**overrides))
    opts = build_optimizers(model, model.cfg, fused=False)
    assert set(opts) == {"muon", "embed", "scalar"}
    seen = Counter(id(p) for opt in opts.values() for g in opt.param_groups for p in g["params"])
    assert set(seen) == {id(p) for p in model.parameters()}
    assert set(seen.values()) == {1}
    groups = {r.name: r.rule.group for r in param_table(model)}
    params = dict(model.named_parameters())
    for key, opt in opts.items():
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        assert in_opt == {id(params[n]) for n, g in groups.items() if g == key}
        for group in opt.param_groups:
            assert group["base_lr"] == group["lr"]


def test_optimizer_settings(tiny_model):
    cfg = tiny_model.cfg
    opts = build_optimizers(tiny_model, cfg, fused=False)
    muon = opts["muon"]
    assert type(muon) is train_gpt.Muon
    (g,) = muon.param_groups
    assert g["lr"] == cfg.matrix_lr and g["weight_decay"] == cfg.muon_wd == 0.04
    assert muon.ns_steps == cfg.muon_backend_steps == 5 and muon.ns_dtype == torch.bfloat16  # no Runtime: bf16
    assert g["momentum"] == cfg.muon_momentum_warmup_start
    assert train_gpt.NS_COEFFICIENTS == pytest.approx((3.4445, -4.7750, 2.0315))
    for key, lr in (("embed", cfg.tied_embed_lr), ("scalar", cfg.scalar_lr)):
        opt = opts[key]
        assert type(opt) is torch.optim.Adam
        (g,) = opt.param_groups
        assert g["lr"] == lr and g["betas"] == (cfg.beta1, cfg.beta2) and g["eps"] == cfg.adam_eps
        assert g["weight_decay"] == 0.0


# --- Muon update vs a hand-written reference-style update ---

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def reference_ns5(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The reference's Newton-Schulz: bf16, Frobenius-normalised, transposed when tall."""
    a, b, c = NS_COEFFS
    x = g.bfloat16()
    x = x / (x.norm() + 1e-7)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        A = x @ x.T
        B = b * A + c * A @ A
        x = a * x + B @ x
    return x.T if tall else x


class ReferenceMuon:
    def __init__(self, params, lr, momentum, wd):
        self.params, self.lr, self.momentum, self.wd = params, lr, momentum, wd
        self.bufs = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads):
        mu = self.momentum
        for p, g, buf in zip(self.params, grads, self.bufs):
            buf.mul_(mu).add_(g)  # buf = mu buf + g
            g2 = g + mu * buf  # nesterov
            update = reference_ns5(g2).float() * math.sqrt(max(1.0, p.size(0) / p.size(1)))
            p.mul_(1 - self.lr * self.wd)
            p.add_(update, alpha=-self.lr)


def test_muon_step_matches_reference_update(tiny_cfg):
    # A large LR and weight decay make both terms of the update visible at bf16 tolerance.
    cfg = tiny_cfg(matrix_lr=0.05, muon_wd=0.5, muon_momentum_warmup_start=0.9)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.2)
    muon = build_optimizers(model, cfg, fused=False)["muon"]
    params = muon.param_groups[0]["params"]
    shapes = {tuple(p.shape) for p in params}
    assert (64, 32) in shapes and (32, 64) in shapes and (16, 32) in shapes  # tall, wide, kv
    ref_params = [p.detach().clone() for p in params]
    start = [p.detach().clone() for p in params]
    ref = ReferenceMuon(ref_params, lr=0.05, momentum=0.9, wd=0.5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        muon.step()
        ref.step(grads)
    for p, r, p0 in zip(params, ref_params, start):
        delta, ref_delta = p.detach() - p0, r - p0
        rel = (delta - ref_delta).norm() / ref_delta.norm()
        # Two bf16 Newton-Schulz implementations differ by ~2-3 % (op order, rounding); dropping nesterov,
        # the aspect scale or the weight decay, or using adjust_lr_fn="match_rms_adamw", is off by >= 9 %.
        assert rel < 5e-2, (tuple(p.shape), rel.item())


def test_muon_tall_matrix_gets_sqrt_aspect_scale(tiny_cfg):
    cfg = tiny_cfg(matrix_lr=0.1, muon_wd=0.0)
    torch.manual_seed(0)
    model = GPT(cfg)
    muon = build_optimizers(model, cfg, fused=False)["muon"]
    fc, proj = model.blocks[0].mlp.fc.weight, model.blocks[0].mlp.proj.weight  # (64, 32) and (32, 64)
    g = torch.randn(64, 32)
    fc0, proj0 = fc.detach().clone(), proj.detach().clone()
    for p in muon.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    fc.grad, proj.grad = g.clone(), g.T.clone()
    muon.step()
    d_fc, d_proj = fc.detach() - fc0, proj.detach() - proj0
    # Same orthogonalised direction (transposed), scaled by sqrt(64/32) for the tall matrix only.
    torch.testing.assert_close(d_fc, d_proj.T * math.sqrt(2), rtol=0, atol=1e-6)
    o = reference_ns5(g).float()
    torch.testing.assert_close(d_fc, -0.1 * math.sqrt(2) * o, rtol=0, atol=5e-3)


def test_muon_weight_decay_is_decoupled_and_lr_scaled(tiny_cfg):
    cfg = tiny_cfg(matrix_lr=0.1, muon_wd=0.3)
    torch.manual_seed(0)
    model = GPT(cfg)
    muon = build_optimizers(model, cfg, fused=False)["muon"]
    params = muon.param_groups[0]["params"]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)  # no gradient: only the decay acts
    muon.param_groups[0]["lr"] = 0.05  # the scheduled LR, not the base LR, scales the decay
    muon.step()
    for p, b in zip(params, before):
        torch.testing.assert_close(p.detach(), b * (1 - 0.05 * 0.3), rtol=1e-6, atol=0)
