"""Gated rank-one edit layers (perfusion/roe.py) against the equations of docs/method.md."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from perfusion.roe import (
    EditState,
    RankOneEditLinear,
    cholesky_qr_basis,
    concept_gate,
    edited_layers,
    energy,
    project_onto_targets,
    similarity,
    swap_cross_attention_projections,
)

torch.set_num_threads(2)

DIM, OUT = 24, 20


def random_c_inv(dim=DIM, tokens=200, seed=0, dtype=torch.float64):
    """C^-1 of the uncentered covariance of random 'token encodings' (SPD)."""
    gen = torch.Generator().manual_seed(seed)
    encodings = torch.randn(tokens, dim, generator=gen, dtype=dtype) * torch.linspace(0.3, 2.0, dim, dtype=dtype)
    covariance = encodings.T @ encodings / tokens
    return torch.linalg.inv(covariance)


def make_layer(role="value", dtype=torch.float64, num_concepts=1, seed=1, state=None):
    torch.manual_seed(seed)
    linear = nn.Linear(DIM, OUT, bias=False).to(dtype)
    state = state or EditState()
    return RankOneEditLinear(linear, role, state, num_concepts), state


def method_single_concept(e, weight, c_inv, i_star, o_star, beta, tau):
    """The single-concept equations of docs/method.md, written out with the explicit C^-1."""
    sim = e @ c_inv @ i_star
    en = i_star @ c_inv @ i_star
    e_perp = e - (sim / en)[..., None] * i_star
    gate = torch.sigmoid((sim / en - beta) / tau)
    return e_perp @ weight.T + gate[..., None] * o_star


def c_inv_orthogonal(x, i_star, c_inv):
    """x minus its C^-1 projection on i*: e^T C^-1 i* = 0."""
    return x - ((x @ c_inv @ i_star) / (i_star @ c_inv @ i_star))[..., None] * i_star


# ---------------------------------------------------------------------------------------------
# Equations
# ---------------------------------------------------------------------------------------------

def test_similarity_and_energy_equal_explicit_c_inv_products():
    c_inv = random_c_inv()
    targets = torch.randn(3, DIM, dtype=torch.float64)
    a = targets @ c_inv                                  # rows a_k = C^-1 i*_k (C^-1 symmetric)
    e = torch.randn(2, 5, DIM, dtype=torch.float64)
    sim = similarity(e, a)
    assert sim.shape == (2, 5, 3)
    assert torch.allclose(sim, torch.einsum("bld,de,ke->blk", e, c_inv, targets), atol=1e-10)
    en = energy(targets, a)
    assert en.shape == (3,)
    assert torch.allclose(en, torch.einsum("kd,de,ke->k", targets, c_inv, targets), atol=1e-10)
    gate = concept_gate(sim, en, torch.tensor([0.5, 0.6, 0.7], dtype=torch.float64), 0.1)
    expected = 1 / (1 + torch.exp(-((sim / en) - torch.tensor([0.5, 0.6, 0.7], dtype=torch.float64)) / 0.1))
    assert torch.allclose(gate, expected, atol=1e-12)


def test_single_concept_projection_is_sim_over_energy_times_target():
    c_inv = random_c_inv()
    i_star = torch.randn(1, DIM, dtype=torch.float64)
    a = i_star @ c_inv
    e = torch.randn(4, 7, DIM, dtype=torch.float64)
    expected = (similarity(e, a) / energy(i_star, a)) * i_star[0]
    assert torch.allclose(project_onto_targets(e, i_star, a), expected, atol=1e-10)


def test_cholesky_qr_basis_is_orthonormal_in_c_inv_metric_and_spans_targets():
    c_inv = random_c_inv(seed=3)
    targets = torch.randn(3, DIM, dtype=torch.float64)
    basis = cholesky_qr_basis(c_inv, targets)
    assert basis.shape == (3, DIM)
    assert torch.allclose(basis @ c_inv @ basis.T, torch.eye(3, dtype=torch.float64), atol=1e-10)
    # span(U) = span(I): projecting the targets onto span(U) returns them unchanged.
    reprojected = (targets @ c_inv @ basis.T) @ basis
    assert torch.allclose(reprojected, targets, atol=1e-9)


@pytest.mark.parametrize("num_concepts", [1, 2, 4])
def test_closed_form_projection_equals_cholesky_qr_form(num_concepts):
    c_inv = random_c_inv(seed=4)
    targets = torch.randn(num_concepts, DIM, dtype=torch.float64)
    a = targets @ c_inv
    e = torch.randn(3, 9, DIM, dtype=torch.float64)
    basis = cholesky_qr_basis(c_inv, targets)
    qr_projection = (e @ c_inv @ basis.T) @ basis          # sum_k u_k (u_k^T C^-1 e)
    assert torch.allclose(project_onto_targets(e, targets, a), qr_projection, atol=1e-10)


def test_projection_float32_close_to_float64_and_keeps_input_dtype():
    c_inv = random_c_inv(seed=5)
    targets = torch.randn(2, DIM, dtype=torch.float64)
    a = targets @ c_inv
    e = torch.randn(2, 5, DIM, dtype=torch.float64)
    reference = project_onto_targets(e, targets, a)
    single = project_onto_targets(e.float(), targets.float(), a.float())
    assert single.dtype == torch.float32
    assert torch.allclose(single.double(), reference, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Layer behaviour
# ---------------------------------------------------------------------------------------------

def setup_single(role="value", dtype=torch.float64, beta=0.75, tau=0.1, seed=7):
    c_inv = random_c_inv(seed=seed).to(dtype)
    layer, state = make_layer(role, dtype, seed=seed)
    i_star = torch.randn(DIM, dtype=dtype)
    state.set_targets(i_star, i_star @ c_inv)
    state.set_gating(beta, tau)
    o_star = torch.randn(OUT, dtype=dtype) * 3
    layer.set_target_outputs(o_star)
    return layer, state, c_inv, i_star, o_star


def test_saturated_gate_maps_target_input_to_target_output():
    layer, state, c_inv, i_star, o_star = setup_single(beta=0.0, tau=0.01)
    out = layer(i_star[None, None])
    assert torch.allclose(out[0, 0], o_star, atol=1e-10)
    # A scaled target input (sim/energy = 2) also lands on o*: e_perp = 0, gate saturated.
    assert torch.allclose(layer(2 * i_star[None, None])[0, 0], o_star, atol=1e-10)


def test_c_inv_orthogonal_input_is_plain_projection_and_gate_is_sigmoid_minus_beta_over_tau():
    layer, state, c_inv, i_star, o_star = setup_single(beta=5.0, tau=0.1)
    e = c_inv_orthogonal(torch.randn(2, 6, DIM, dtype=torch.float64), i_star, c_inv)
    assert torch.allclose(e @ c_inv @ i_star, torch.zeros(2, 6, dtype=torch.float64), atol=1e-9)
    plain = F.linear(e, layer.weight)
    assert torch.allclose(layer(e), plain, atol=1e-9)          # gate = sigmoid(-50) ~ 2e-22

    # With a moderate beta the gate at e is exactly sigmoid(-beta / tau): out - W e = gate * o*.
    beta, tau = 0.3, 0.15
    state.set_gating(beta, tau)
    residual = layer(e) - plain
    expected_gate = 1 / (1 + math.exp(beta / tau))
    assert torch.allclose(residual, expected_gate * o_star.expand_as(residual), atol=1e-9)


def test_gate_decreases_monotonically_with_beta():
    layer, state, c_inv, i_star, o_star = setup_single(tau=0.15)
    e = (0.8 * i_star + 0.3 * torch.randn(DIM, dtype=torch.float64))[None, None]
    e_perp_out = F.linear(e - project_onto_targets(e, state.target_inputs, state.c_inv_target_inputs),
                          layer.weight)
    gates = []
    for beta in torch.linspace(-0.5, 2.0, 12).tolist():
        state.set_gating(beta, 0.15)
        residual = (layer(e) - e_perp_out)[0, 0]
        gates.append((residual @ o_star / (o_star @ o_star)).item())   # out - W e_perp = gate * o*
    differences = torch.diff(torch.tensor(gates))
    assert (differences < 0).all(), gates
    assert gates[0] > 0.9 and gates[-1] < 0.01


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_layer_matches_single_concept_equations(dtype, tolerance):
    layer, state, c_inv, i_star, o_star = setup_single(dtype=dtype, beta=0.7, tau=0.15, seed=11)
    e = torch.randn(3, 8, DIM, dtype=dtype)
    e[:, 2] = 0.9 * i_star + 0.1 * e[:, 2]          # put the concept token somewhere in each prompt
    expected = method_single_concept(e.double(), layer.weight.double(), c_inv.double(), i_star.double(),
                                     o_star.double(), 0.7, 0.15)
    scale = expected.abs().max()
    assert ((layer(e).double() - expected).abs().max() / scale) < tolerance


def test_two_concepts_each_token_opens_its_own_gate():
    c_inv = random_c_inv(seed=12)
    layer, state = make_layer("value", num_concepts=2, seed=12)
    first = torch.randn(DIM, dtype=torch.float64)
    second = c_inv_orthogonal(torch.randn(DIM, dtype=torch.float64), first, c_inv)
    targets = torch.stack([first, second])
    state.set_targets(targets, targets @ c_inv)
    state.set_gating([0.6, 0.6], [0.15, 0.15])
    # o*_1, o*_2 = unit vectors: since i*_k lies in span(I), e_perp = 0 and out(i*_k) = (gate_1, gate_2, 0...).
    layer.set_target_outputs(torch.eye(2, OUT, dtype=torch.float64))
    out = layer(targets[None])[0]
    gates = out[:, :2]
    assert torch.allclose(out[:, 2:], torch.zeros(2, OUT - 2, dtype=torch.float64), atol=1e-10)
    assert gates[0, 0] > 0.9 and gates[1, 1] > 0.9
    assert gates[0, 1] < 0.02 and gates[1, 0] < 0.02
    assert torch.allclose(gates.diagonal(), torch.sigmoid(torch.tensor(0.4 / 0.15, dtype=torch.float64)).expand(2))
    # Per-concept beta: lowering beta_2 strengthens only concept 2.
    state.set_gating([0.6, 0.3], 0.15)
    regated = layer(targets[None])[0, :, :2]
    assert torch.allclose(regated[0, 0], gates[0, 0]) and regated[1, 1] > gates[1, 1] + 0.05


def test_multi_concept_layer_with_one_concept_equals_single_concept_form():
    c_inv = random_c_inv(seed=13)
    layer, state = make_layer("value", num_concepts=1, seed=13)
    i_star = torch.randn(DIM, dtype=torch.float64)
    o_star = torch.randn(OUT, dtype=torch.float64)
    state.set_targets(i_star[None], (i_star @ c_inv)[None])
    state.set_gating([0.65], [0.12])
    layer.set_target_outputs(o_star[None])
    e = torch.randn(2, 10, DIM, dtype=torch.float64) + 0.5 * i_star
    expected = method_single_concept(e, layer.weight, c_inv, i_star, o_star, 0.65, 0.12)
    assert torch.allclose(layer(e), expected, atol=1e-10)
    # Multi-concept form through the Cholesky/QR basis with K = 1 gives the same edit.
    basis = cholesky_qr_basis(c_inv, i_star[None])
    qr_out = (e - (e @ c_inv @ basis.T) @ basis) @ layer.weight.T + \
        torch.sigmoid(((e @ c_inv @ i_star) / (i_star @ c_inv @ i_star) - 0.65) / 0.12)[..., None] * o_star
    assert torch.allclose(layer(e), qr_out, atol=1e-10)


def test_disabled_state_and_no_targets_give_exactly_w_e():
    layer, state, c_inv, i_star, o_star = setup_single(beta=0.0, tau=0.01)
    e = torch.randn(2, 5, DIM, dtype=torch.float64)
    e[:, 1] = i_star
    assert not torch.equal(layer(e), F.linear(e, layer.weight))
    state.set_enabled(False)
    assert torch.equal(layer(e), F.linear(e, layer.weight))
    state.set_enabled(True)
    state.set_targets(None, None)
    assert torch.equal(layer(e), F.linear(e, layer.weight))


def test_initialize_targets_is_w_times_superclass_and_resizes():
    key, state = make_layer("key", seed=14)
    i_super = torch.randn(DIM, dtype=torch.float64)
    key.initialize_targets(i_super)
    assert key.target_output.shape == (1, OUT)
    assert torch.allclose(key.target_output[0], key.weight @ i_super, atol=1e-6)   # float32 product
    two = torch.randn(2, DIM, dtype=torch.float64)
    key.initialize_targets(two)
    assert key.target_output.shape == (2, OUT) and "target_output" in dict(key.named_buffers())
    assert torch.allclose(key.target_output, two @ key.weight.T, atol=1e-6)
    value, _ = make_layer("value", seed=14)
    parameter = value.target_output
    value.initialize_targets(i_super)
    assert value.target_output is parameter          # same shape: copied in place (optimizer keeps it)
    value.set_target_outputs(torch.zeros(3, OUT))
    assert isinstance(value.target_output, nn.Parameter) and value.target_output.shape == (3, OUT)


def test_mismatched_number_of_concepts_is_a_clear_error():
    layer, state, c_inv, i_star, o_star = setup_single()
    targets = torch.randn(2, DIM, dtype=torch.float64)
    state.set_targets(targets, targets @ c_inv)
    with pytest.raises(RuntimeError, match="2 concept"):
        layer(torch.randn(1, 3, DIM, dtype=torch.float64))
    state.set_gating([0.5, 0.6, 0.7], 0.1)
    layer.set_target_outputs(torch.zeros(2, OUT, dtype=torch.float64))
    with pytest.raises(ValueError, match="beta has 3 values"):
        layer(torch.randn(1, 3, DIM, dtype=torch.float64))
    with pytest.raises(ValueError, match="tau must be > 0"):
        state.set_gating(0.5, 0.0)
    with pytest.raises(ValueError, match="bias-free"):
        RankOneEditLinear(nn.Linear(DIM, OUT), "key", state)


def test_gradients_reach_value_target_and_input_only():
    value, state, c_inv, i_star, o_star = setup_single("value", dtype=torch.float32, beta=0.75, tau=0.1)
    key = RankOneEditLinear(nn.Linear(DIM, OUT, bias=False), "key", state)
    key.initialize_targets(torch.randn(DIM))
    assert [n for n, p in key.named_parameters() if p.requires_grad] == []
    assert [n for n, p in value.named_parameters() if p.requires_grad] == ["target_output"]
    e = torch.randn(2, 5, DIM)
    e[:, 3] = i_star.float()
    e.requires_grad_(True)
    (value(e).square().sum() + key(e).square().sum()).backward()
    assert value.weight.grad is None and key.weight.grad is None
    assert value.target_output.grad is not None and value.target_output.grad.abs().sum() > 0
    assert e.grad is not None and e.grad.abs().sum() > 0           # the word embedding learns through e


def test_bfloat16_autocast_keeps_gate_in_float32():
    layer, state, c_inv, i_star, o_star = setup_single("value", dtype=torch.float32, beta=0.7, tau=0.15)
    e = torch.randn(2, 6, DIM)
    e[:, 2] = i_star.float()
    reference = layer(e)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = layer(e)
    assert torch.allclose(mixed.float(), reference, atol=0.1, rtol=0.02)


# ---------------------------------------------------------------------------------------------
# Per-prompt work: the projection folded into the weight once per EditState change
# ---------------------------------------------------------------------------------------------

def test_edited_weight_is_rebuilt_exactly_when_the_state_or_weight_changes():
    layer, state, c_inv, i_star, o_star = setup_single("value", dtype=torch.float32, beta=0.7, tau=0.15)
    e = torch.randn(2, 7, DIM)
    e[:, 1] = i_star.float()
    expected = F.linear(e - project_onto_targets(e, state.target_inputs, state.c_inv_target_inputs), layer.weight)
    with torch.no_grad():
        folded = layer.edited_weight(torch.float32)
        assert torch.allclose(F.linear(e, folded), expected, atol=1e-5)
        assert layer.edited_weight(torch.float32) is folded                # same state: made once
        state.set_gating(0.5, 0.15)                                         # any setter makes a new state
        assert layer.edited_weight(torch.float32) is not folded
        refolded = layer.edited_weight(torch.float32)
        layer.weight.mul_(2.0)                                              # in-place change of W
        assert torch.allclose(layer.edited_weight(torch.float32), 2 * refolded, atol=1e-5)
        assert layer.edited_weight(torch.float64).dtype == torch.float64
    # the fold keeps the gradient path to the input (the embedding trains through it) and to o*_V
    e = e.requires_grad_()
    layer(e).sum().backward()
    assert e.grad is not None and layer.target_output.grad is not None and layer.weight.grad is None


# ---------------------------------------------------------------------------------------------
# UNet surgery on a miniature module tree with SD's attribute names
# ---------------------------------------------------------------------------------------------

class MiniAttention(nn.Module):
    def __init__(self, query_dim, context_dim=None, heads=2, head_dim=8):
        super().__init__()
        inner = heads * head_dim
        self.is_cross_attention = context_dim is not None
        context_dim = context_dim if context_dim is not None else query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim)

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.to_out(out.transpose(1, 2).flatten(-2))


class MiniTransformerBlock(nn.Module):
    def __init__(self, dim, context_dim):
        super().__init__()
        self.attn1 = MiniAttention(dim)
        self.attn2 = MiniAttention(dim, context_dim)

    def forward(self, x, context):
        x = x + self.attn1(x)
        return x + self.attn2(x, context)


class MiniUNet(nn.Module):
    def __init__(self, context_dim=DIM, widths=(16, 32, 16)):
        super().__init__()
        self.input_blocks = nn.ModuleList([MiniTransformerBlock(widths[0], context_dim)])
        self.middle_block = MiniTransformerBlock(widths[1], context_dim)
        self.output_blocks = nn.ModuleList([MiniTransformerBlock(widths[2], context_dim)])
        self.up = nn.Linear(widths[0], widths[1])
        self.down = nn.Linear(widths[1], widths[2])

    def forward(self, x, context):
        x = self.input_blocks[0](x, context)
        x = self.middle_block(self.up(x), context)
        return self.output_blocks[0](self.down(x), context)


EXPECTED_NAMES = [
    "input_blocks.0.attn2.to_k", "input_blocks.0.attn2.to_v",
    "middle_block.attn2.to_k", "middle_block.attn2.to_v",
    "output_blocks.0.attn2.to_k", "output_blocks.0.attn2.to_v",
]


def build_swapped(seed=20):
    torch.manual_seed(seed)
    original = MiniUNet()
    swapped = copy.deepcopy(original)
    state = EditState()
    layers = swap_cross_attention_projections(swapped, state)
    return original, swapped, state, layers


def test_swap_replaces_only_cross_attention_keys_and_values():
    original, swapped, state, layers = build_swapped()
    assert list(layers) == EXPECTED_NAMES
    assert [layer.role for layer in layers.values()] == ["key", "value"] * 3
    assert list(edited_layers(swapped)) == EXPECTED_NAMES
    assert list(edited_layers(swapped, "value")) == EXPECTED_NAMES[1::2]
    assert isinstance(swapped.input_blocks[0].attn1.to_k, nn.Linear)      # self-attention untouched
    assert all(layer.state is state for layer in layers.values())
    # Idempotent: a second swap returns the same layers and wraps nothing twice.
    again = swap_cross_attention_projections(swapped, state)
    assert list(again) == EXPECTED_NAMES and all(again[n] is layers[n] for n in EXPECTED_NAMES)
    with pytest.raises(ValueError, match="different EditState"):
        swap_cross_attention_projections(swapped, EditState())


def test_swapped_state_dict_keeps_original_keys_and_loads_original_weights():
    original, swapped, state, layers = build_swapped()
    original_state = original.state_dict()
    swapped_state = swapped.state_dict()
    extra = sorted(set(swapped_state) - set(original_state))
    assert extra == sorted(f"{n}.target_output" for n in EXPECTED_NAMES)
    assert set(original_state) <= set(swapped_state)
    # A fresh swapped model loads the original (checkpoint) weights under the same keys.
    torch.manual_seed(99)
    fresh = MiniUNet()
    swap_cross_attention_projections(fresh, EditState())
    result = fresh.load_state_dict(original_state, strict=False)
    assert sorted(result.missing_keys) == extra and result.unexpected_keys == []
    for name, tensor in original_state.items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    # With no concept set the swapped UNet computes exactly what the original does.
    x, context = torch.randn(2, 9, 16), torch.randn(2, 7, DIM)
    assert torch.allclose(swapped(x, context), original(x, context), atol=1e-6)


def test_global_locking_changes_keys_only():
    original, swapped, state, layers = build_swapped()
    c_inv = random_c_inv(seed=21).float()
    i_star, i_super = torch.randn(DIM), torch.randn(DIM)
    state.set_targets(i_star, i_star @ c_inv)
    state.set_gating(0.5, 0.15)
    for layer in layers.values():
        layer.initialize_targets(i_super)
    concept_prompt = torch.randn(2, 7, DIM)
    concept_prompt[:, 3] = i_star
    superclass_prompt = concept_prompt.clone()
    superclass_prompt[:, 3] = i_super
    other_prompt = torch.randn(1, 7, DIM)                               # e.g. the empty prompt of guidance
    batch = torch.cat([other_prompt, concept_prompt])
    local = {name: layer(batch) for name, layer in layers.items()}
    state.set_global_locking(concept_prompt, superclass_prompt)
    for name, layer in layers.items():
        out = layer(batch)
        if layer.role == "value":
            assert torch.equal(out, local[name]), name
        else:
            assert torch.allclose(out[1:], F.linear(superclass_prompt, layer.weight), atol=1e-6), name
            assert torch.allclose(out[:1], F.linear(other_prompt, layer.weight), atol=1e-6), name
            assert not torch.allclose(out[1:], local[name][1:], atol=1e-3), name
    # rows are matched by content, in any order, and through a half-precision round trip
    key = layers[EXPECTED_NAMES[0]]
    swapped_rows = torch.cat([concept_prompt.flip(0), other_prompt]).half().float()
    assert torch.allclose(key(swapped_rows)[:2], F.linear(superclass_prompt.flip(0), key.weight), atol=1e-6)
    with pytest.raises(ValueError, match="none of the prompts"):
        key(other_prompt)
    with pytest.raises(ValueError, match="shape"):
        key(torch.randn(2, 5, DIM))
    with pytest.raises(ValueError, match="one super-class encoding per prompt"):
        state.set_global_locking(concept_prompt, superclass_prompt[:1])


def test_swap_rejects_models_without_cross_attention():
    with pytest.raises(ValueError, match="no cross-attention"):
        swap_cross_attention_projections(nn.Sequential(nn.Linear(4, 4)), EditState())


def test_training_step_updates_only_value_targets():
    """One AdamW step of the Perfusion recipe on the mini UNet: only o*_V (and the input) move."""
    original, swapped, state, layers = build_swapped(seed=22)
    c_inv = random_c_inv(seed=22).float()
    i_star, i_super = torch.randn(DIM), torch.randn(DIM)
    state.set_targets(i_star, i_star @ c_inv)
    for layer in layers.values():
        layer.initialize_targets(i_super)
    for name, parameter in swapped.named_parameters():
        if not name.endswith("to_v.target_output"):
            parameter.requires_grad_(False)
    trainable = [p for p in swapped.parameters() if p.requires_grad]
    assert len(trainable) == 3
    before = copy.deepcopy(swapped.state_dict())
    optimizer = torch.optim.AdamW(trainable, lr=0.03)
    context = torch.randn(2, 7, DIM)
    context[:, 2] = i_star
    loss = swapped(torch.randn(2, 9, 16), context).square().mean()
    loss.backward()
    optimizer.step()
    after = swapped.state_dict()
    changed = sorted(name for name in before if not torch.equal(before[name], after[name]))
    assert changed == sorted(f"{n}.target_output" for n in EXPECTED_NAMES[1::2])


# ---------------------------------------------------------------------------------------------
# The project's own SD modules (ldm/), tiny sizes, random weights
# ---------------------------------------------------------------------------------------------

def test_swap_on_spatial_transformer_edits_attn2_only():
    from ldm.modules.attention import SpatialTransformer

    torch.manual_seed(30)
    block = SpatialTransformer(32, n_heads=2, d_head=8, depth=2, context_dim=DIM).eval()
    for parameter in block.proj_out.parameters():       # zero-initialised: make the attention path visible
        nn.init.normal_(parameter, std=0.1)
    original = copy.deepcopy(block)
    state = EditState()
    layers = swap_cross_attention_projections(block, state)
    assert list(layers) == [f"transformer_blocks.{i}.attn2.{p}" for i in range(2) for p in ("to_k", "to_v")]
    assert isinstance(block.transformer_blocks[0].attn1.to_k, nn.Linear)
    x, context = torch.randn(2, 32, 4, 4), torch.randn(2, 7, DIM)
    with torch.no_grad():
        assert torch.allclose(block(x, context), original(x, context), atol=1e-6)
        c_inv = random_c_inv(seed=31).float()
        i_star = torch.randn(DIM)
        state.set_targets(i_star, i_star @ c_inv)
        for layer in layers.values():
            layer.initialize_targets(torch.randn(DIM))
        context[:, 4] = i_star
        edited = block(x, context)
        assert (edited - original(x, context)).abs().max() > 1e-3      # the concept token changes the image
        # Closed gates and a context C^-1-orthogonal to i*: W e_perp = W e, the block is unchanged.
        context_without = c_inv_orthogonal(context.double(), i_star.double(), c_inv.double()).float()
        state.set_gating(5.0, 0.1)
        assert torch.allclose(block(x, context_without), original(x, context_without), atol=1e-5)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_swapped_tiny_sd_unet_loads_checkpoint_and_edits_the_output(tmp_path, family):
    """Real UNetModel of both families: checkpoint loads into the swapped model, no-concept output is
    unchanged, and a concept changes it, the same at every step for the same prompt."""
    from tests._tiny_models import build_tiny_model, write_tiny_checkpoint

    from ldm.util import load_state_dict

    path = tmp_path / f"tiny-{family}.safetensors"
    reference = write_tiny_checkpoint(path, family, seed=32)
    model = build_tiny_model(family, seed=33)                 # different weights until the checkpoint loads
    state = EditState()
    layers = swap_cross_attention_projections(model.model.diffusion_model, state)
    assert len(layers) == 14 and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in layers)
    # Swapping keeps every checkpoint key: an SD checkpoint loads into the swapped model unchanged
    # (init_from_ckpt is meant to run before the swap and rejects the extra target_output keys).
    checkpoint = load_state_dict(path)
    missing, unexpected = model.load_state_dict(checkpoint, strict=False)
    assert sorted(missing) == sorted(f"model.diffusion_model.{n}.target_output" for n in layers)
    assert unexpected == []
    assert all(torch.equal(model.state_dict()[k], v) for k, v in checkpoint.items())

    gen = torch.Generator().manual_seed(34)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 600])
    with torch.no_grad():
        cond = model.get_learned_conditioning(["a photo of a teddy", ""])
        expected = reference.apply_model(x, t, cond)
        assert torch.allclose(model.apply_model(x, t, cond), expected, atol=1e-5)

        dim = cond.shape[-1]
        c_inv = random_c_inv(dim=dim, seed=35).float()
        i_star = cond[0, 4]
        state.set_targets(i_star, i_star @ c_inv)
        state.set_gating(0.6, 0.15)
        for layer in layers.values():
            layer.initialize_targets(torch.randn(dim, generator=gen))
        edited = model.apply_model(x, t, torch.cat([cond[1:], cond[:1]]))
        assert (edited - model.apply_model(x, t, torch.cat([cond[1:], cond[:1]]))).abs().max() == 0
        assert (edited - reference.apply_model(x, t, torch.cat([cond[1:], cond[:1]]))).abs().max() > 1e-4
