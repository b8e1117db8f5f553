"""Gated rank-one editing (ROE) of cross-attention key/value projections.

Every equation of the method (docs/method.md sections 2, 4 and 5; the gated forward pass is the paper's
Eq. 3) lives in exactly one function here:

    similarity(e, a)              sim_k(e) = e^T C^-1 i*_k = e . a_k                       (Eq. 3, method.md 2)
    energy(I, A)                  energy_k = i*_k^T C^-1 i*_k = i*_k . a_k                  (Eq. 3, method.md 2)
    concept_gate(sim, en, b, t)   gate_k = sigmoid((sim_k / energy_k - beta_k) / tau_k)     (Eq. 3, method.md 4)
    project_onto_targets(e, I, A) I G^-1 A^T e, G = A^T I   (e_perp = e - this)          (method.md 2 and 5)
    cholesky_qr_basis(C^-1, I)    u_k with U^T C^-1 U = identity, span(U) = span(I)      (method.md 5)

Shapes: target inputs ``I`` and ``A = C^-1 I`` are stored row-wise, (K, D), one row per concept.

``RankOneEditLinear`` replaces a frozen ``to_k`` / ``to_v`` and computes

    out(e) = W e_perp + sum_k gate_k(e) o*_k

All edited layers of one UNet share one ``EditState`` that carries the per-prompt quantities
(target inputs, beta/tau, global locking), so no UNet forward signature changes.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "similarity",
    "energy",
    "concept_gate",
    "project_onto_targets",
    "cholesky_qr_basis",
    "EditState",
    "GlobalLocking",
    "RankOneEditLinear",
    "swap_cross_attention_projections",
    "edited_layers",
]

ROLES = ("key", "value")

# The gate's bias beta and temperature tau (docs/method.md section 4), declared here once: during training, and at
# inference for one concept or several (a lower beta opens each gate a little wider when concepts share a prompt).
TRAIN_BETA, TRAIN_TAU = 0.75, 0.10
INFERENCE_BETA, MULTI_CONCEPT_BETA, INFERENCE_TAU = 0.7, 0.6, 0.15


def inference_gating(num_concepts: int) -> tuple[float, float]:
    """Default (beta, tau) at inference for ``num_concepts`` concepts."""
    return (MULTI_CONCEPT_BETA if num_concepts > 1 else INFERENCE_BETA), INFERENCE_TAU


# ---------------------------------------------------------------------------------------------
# Equations
# ---------------------------------------------------------------------------------------------

def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precision is too coarse for the solve)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def similarity(e: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """sim_k(e) = e^T C^-1 i*_k, computed as e . a_k with a_k = C^-1 i*_k.

    e: (..., D); a: (K, D) -> (..., K).
    """
    return e @ a.transpose(0, 1)


def energy(target_inputs: torch.Tensor, c_inv_target_inputs: torch.Tensor) -> torch.Tensor:
    """energy_k = i*_k^T C^-1 i*_k = i*_k . a_k.  (K, D), (K, D) -> (K,)."""
    return (target_inputs * c_inv_target_inputs).sum(dim=-1)


def concept_gate(sim: torch.Tensor, energy: torch.Tensor, beta, tau) -> torch.Tensor:
    """gate_k = sigmoid((sim_k / energy_k - beta_k) / tau_k); broadcasts over the last (K) dim."""
    return torch.sigmoid((sim / energy - beta) / tau)


def project_onto_targets(e: torch.Tensor, target_inputs: torch.Tensor,
                         c_inv_target_inputs: torch.Tensor) -> torch.Tensor:
    """The C^-1-oblique projection of e onto span(I):  I G^-1 A^T e  with  G = A^T I.

    e: (..., D); target_inputs I: (K, D); c_inv_target_inputs A: (K, D) -> (..., D), dtype of e.
    For K = 1 this is (sim / energy) i*, so e_perp = e - project_onto_targets(e, I, A).
    Computed in float32 (float64 if any input is float64) with a linear solve, never an inverse.
    """
    dtype = _compute_dtype(e, target_inputs, c_inv_target_inputs)
    targets = target_inputs.to(dtype)
    c_inv_targets = c_inv_target_inputs.to(dtype)
    e_c = e.to(dtype)
    gram = c_inv_targets @ targets.transpose(0, 1)            # G_jk = a_j . i*_k  (K, K), SPD
    sims = similarity(e_c, c_inv_targets)                      # A^T e  (..., K)
    flat = sims.reshape(-1, sims.shape[-1]).transpose(0, 1)    # (K, N)
    coeffs = torch.linalg.solve(gram, flat).transpose(0, 1)    # (N, K) = (G^-1 A^T e)^T
    projection = coeffs @ targets                              # (N, D)
    return projection.reshape(e.shape).to(e.dtype)


def cholesky_qr_basis(c_inv: torch.Tensor, target_inputs: torch.Tensor) -> torch.Tensor:
    """Multi-concept basis (docs/method.md section 5): C^-1 = L L^T, Q R = L^T I, u_k = L^-T q_k.

    c_inv: (D, D) SPD; target_inputs: (K, D) -> U: (K, D), rows u_k with u_j^T C^-1 u_k = delta_jk
    and span(U) = span(I), so  sum_k u_k (u_k^T C^-1 e) = project_onto_targets(e, I, C^-1 I).
    Inference never needs this (see project_onto_targets); it documents and tests the closed form.
    """
    dtype = _compute_dtype(c_inv, target_inputs)
    lower = torch.linalg.cholesky(c_inv.to(dtype))                       # C^-1 = L L^T
    q, _ = torch.linalg.qr(lower.transpose(0, 1) @ target_inputs.to(dtype).transpose(0, 1))  # (D, K)
    basis = torch.linalg.solve_triangular(lower.transpose(0, 1), q, upper=True)           # L^-T Q
    return basis.transpose(0, 1)


# ---------------------------------------------------------------------------------------------
# Shared per-prompt state
# ---------------------------------------------------------------------------------------------

def _per_concept(value, name: str) -> torch.Tensor:
    """Scalar or per-concept sequence -> 1-D float tensor."""
    # float64 so that float64 computations see beta/tau exactly as given.
    tensor = torch.as_tensor(value, dtype=torch.float64).detach().reshape(-1).clone()
    if tensor.numel() == 0:
        raise ValueError(f"{name} must be a number or a non-empty list of numbers, got {value!r}")
    return tensor


class EditState:
    """State shared by all edited layers of one UNet (set once per prompt / training step).

    target_inputs (K, D) and c_inv_target_inputs (K, D): i*_k and a_k = C^-1 i*_k, or None
    (no concept: every layer is plain W e).  beta, tau: (K,) (a single value broadcasts to all
    concepts).  global_locking: None (local locking) or a ``GlobalLocking`` that gives key layers
    the super-class prompt's encoding in place of the concept prompt's; value layers are unaffected.
    enabled: False makes every layer exactly W e.  version: bumped by every setter; edited layers
    recompute their per-prompt operators when it changes.
    """

    def __init__(self, beta=TRAIN_BETA, tau=TRAIN_TAU):
        self.target_inputs: Optional[torch.Tensor] = None
        self.c_inv_target_inputs: Optional[torch.Tensor] = None
        self.beta = _per_concept(beta, "beta")
        self.tau = _per_concept(tau, "tau")
        self.global_locking: Optional[GlobalLocking] = None
        self.enabled = True
        self.version = 0
        self._converted: dict = {}

    def _bump(self) -> None:
        self.version += 1
        self._converted = {}

    @property
    def num_concepts(self) -> int:
        return 0 if self.target_inputs is None else self.target_inputs.shape[0]

    def set_targets(self, target_inputs: Optional[torch.Tensor],
                    c_inv_target_inputs: Optional[torch.Tensor]) -> None:
        """Set i*_k and a_k = C^-1 i*_k, (K, D) or (D,) each; None clears them.

        They are statistics (an EMA during training), never trained, so they are detached.
        """
        if target_inputs is None or c_inv_target_inputs is None:
            if target_inputs is not None or c_inv_target_inputs is not None:
                raise ValueError("set_targets: give both target_inputs and c_inv_target_inputs, or neither")
            self.target_inputs = self.c_inv_target_inputs = None
        else:
            targets = target_inputs.detach().reshape(-1, target_inputs.shape[-1])
            c_inv_targets = c_inv_target_inputs.detach().reshape(-1, c_inv_target_inputs.shape[-1])
            if targets.shape != c_inv_targets.shape:
                raise ValueError(f"set_targets: target_inputs {tuple(targets.shape)} and "
                                 f"c_inv_target_inputs {tuple(c_inv_targets.shape)} must have the same (K, D) shape")
            self.target_inputs, self.c_inv_target_inputs = targets, c_inv_targets
        self._bump()

    def set_gating(self, beta, tau) -> None:
        """beta, tau: scalars or per-concept lists (length K)."""
        beta_t, tau_t = _per_concept(beta, "beta"), _per_concept(tau, "tau")
        if (tau_t <= 0).any():
            raise ValueError(f"tau must be > 0 (it is a temperature), got {tau!r}")
        self.beta, self.tau = beta_t, tau_t
        self._bump()

    def set_global_locking(self, prompt_encodings: Optional[torch.Tensor],
                           superclass_encodings: Optional[torch.Tensor] = None) -> None:
        """Global locking: key layers see ``superclass_encodings[n]`` wherever their input is
        ``prompt_encodings[n]`` (each (N, L, D)); None returns to local locking."""
        self.global_locking = (None if prompt_encodings is None
                               else GlobalLocking(prompt_encodings, superclass_encodings))
        self._bump()

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)
        self._bump()

    def gating_tensors(self, device: torch.device, dtype: torch.dtype):
        """(I, A, beta (K,), tau (K,), energy (K,)) on device/dtype, converted once per version (the energies are
        constants of the targets: computing them here keeps two small operations out of every layer's forward)."""
        key = (device, dtype)
        if key not in self._converted:
            k = self.num_concepts
            beta, tau = self.beta, self.tau
            for name, values in (("beta", beta), ("tau", tau)):
                if values.numel() not in (1, k):
                    raise ValueError(f"{name} has {values.numel()} values but there are {k} concepts; "
                                     f"give one value or one per concept")
            targets = self.target_inputs.to(device=device, dtype=dtype)
            c_inv_targets = self.c_inv_target_inputs.to(device=device, dtype=dtype)
            self._converted[key] = (
                targets,
                c_inv_targets,
                beta.to(dtype).to(device).expand(k),
                tau.to(dtype).to(device).expand(k),
                energy(targets, c_inv_targets),
            )
        return self._converted[key]


class GlobalLocking:
    """Which text encodings key layers swap for their super-class counterparts (global locking).

    A key layer's input is a batch of prompt encodings, e.g. [unconditional; conditional] under
    classifier-free guidance.  Each row that equals one of ``prompt_encodings`` (up to the
    rounding of a half-precision copy) is replaced by the matching super-class encoding; other
    rows (the empty prompt of guidance) keep their own keys.  Matching by content keeps the
    batch layout a sampler's business.
    """

    MATCH_TOLERANCE = 1e-2   # relative distance; different prompts differ by far more

    def __init__(self, prompt_encodings: torch.Tensor, superclass_encodings: torch.Tensor):
        if superclass_encodings is None or prompt_encodings.shape != superclass_encodings.shape:
            raise ValueError("global locking needs one super-class encoding per prompt encoding, same shape; got "
                             f"{tuple(prompt_encodings.shape)} and "
                             f"{None if superclass_encodings is None else tuple(superclass_encodings.shape)}")
        self.prompts = prompt_encodings.detach().float()
        self.superclass = superclass_encodings.detach()

    def key_input(self, e: torch.Tensor) -> torch.Tensor:
        """e (B, L, D) with each row that is a locked prompt replaced by its super-class encoding."""
        if e.dim() != 3 or e.shape[1:] != self.prompts.shape[1:]:
            raise ValueError(f"global locking was set for prompt encodings of shape {tuple(self.prompts.shape)} "
                             f"but a key layer got {tuple(e.shape)}; encode the prompts with the same text encoder")
        prompts = self.prompts.to(e.device)
        distance = torch.cdist(e.detach().float().flatten(1), prompts.flatten(1))          # (B, N)
        nearest = distance.argmin(dim=1)
        matched = distance.gather(1, nearest[:, None])[:, 0] <= (
            self.MATCH_TOLERANCE * prompts.flatten(1).norm(dim=1)[nearest])
        if not matched.any():
            raise ValueError("global locking is set, but none of the prompts the UNet got is one of the locked "
                             "prompts; call set_global_locking with the prompts being sampled")
        superclass = self.superclass.to(device=e.device, dtype=e.dtype)[nearest]
        return torch.where(matched[:, None, None], superclass, e)


# ---------------------------------------------------------------------------------------------
# Edited projection
# ---------------------------------------------------------------------------------------------

def _version_or_none(tensor: torch.Tensor):
    """In-place version counter; inference-mode tensors do not track one."""
    return None if tensor.is_inference() else tensor._version


class RankOneEditLinear(nn.Module):
    """A frozen bias-free ``nn.Linear`` (to_k / to_v of a cross-attention) with a gated rank-one edit.

    ``weight`` is the original parameter object (same state_dict key, frozen).  ``target_output``
    (K, out) holds o*_k: a trainable ``nn.Parameter`` for role "value", a buffer for role "key"
    (locked to W_K i_super, never trained).  ``trainable=True`` makes a key's o*_K a parameter too
    (the ``lock_keys: false`` ablation, docs/method.md section 10); None: trainable for values only.

    The projected term W e_perp is computed as ``W_edit e`` with ``W_edit = W - W I^T G^-1 A``
    (``project_onto_targets(W, A, I)``: the adjoint of the projection), made once per
    ``EditState`` change, so a call costs one ordinary matmul plus the K-column gate.
    """

    def __init__(self, linear: nn.Linear, role: str, state: EditState, num_concepts: int = 1,
                 trainable: Optional[bool] = None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"RankOneEditLinear wraps an nn.Linear, got {type(linear).__name__}")
        if linear.bias is not None:
            raise ValueError("RankOneEditLinear needs a bias-free projection (SD's to_k/to_v have bias=False)")
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.role = role
        self.state = state
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        initial = torch.zeros(num_concepts, self.out_features,
                              dtype=self.weight.dtype, device=self.weight.device)
        if trainable is None:
            trainable = role == "value"
        if trainable:
            self.target_output = nn.Parameter(initial)
        else:
            self.register_buffer("target_output", initial)
        self._edited_weight: Optional[tuple] = None   # (key, W_edit) for the current EditState

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, role={self.role}, "
                f"num_concepts={self.target_output.shape[0]}")

    @property
    def num_concepts(self) -> int:
        return self.target_output.shape[0]

    @torch.no_grad()
    def set_target_outputs(self, target_outputs: torch.Tensor) -> None:
        """Set o*_k, (K, out) or (out,).  Same shape: copied in place (optimizer references stay
        valid); new K: the parameter/buffer is replaced (inference with K concepts)."""
        values = target_outputs.detach().reshape(-1, target_outputs.shape[-1])
        if values.shape[-1] != self.out_features:
            raise ValueError(f"target outputs have width {values.shape[-1]}, this layer has "
                             f"out_features={self.out_features}")
        if values.shape == self.target_output.shape:
            self.target_output.copy_(values)
        else:
            fresh = values.to(device=self.target_output.device, dtype=self.target_output.dtype).clone()
            if isinstance(self.target_output, nn.Parameter):
                self.target_output = nn.Parameter(fresh, requires_grad=self.target_output.requires_grad)
            else:
                self.target_output = fresh      # assigning to a registered buffer name keeps it a buffer

    @torch.no_grad()
    def initialize_targets(self, superclass_inputs: torch.Tensor) -> None:
        """o*_k = W i_super_k for both roles ((D,) or (K, D)); for keys this is the lock o*_K."""
        inputs = superclass_inputs.detach().reshape(-1, superclass_inputs.shape[-1])
        if inputs.shape[-1] != self.in_features:
            raise ValueError(f"super-class encoding has dim {inputs.shape[-1]}, this layer expects "
                             f"in_features={self.in_features}")
        with torch.autocast(device_type=self.weight.device.type, enabled=False):
            outputs = F.linear(inputs.to(device=self.weight.device, dtype=torch.float32), self.weight.float())
        self.set_target_outputs(outputs)

    def edited_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W_edit = W - W I^T G^-1 A (so W_edit e = W e_perp), in ``dtype``, made once per EditState change (in
        float32, or float64 for float64 weights or targets: the precision the projection of e had)."""
        key = (self.state.version, dtype, self.weight.device, _version_or_none(self.weight))
        if self._edited_weight is None or self._edited_weight[0] != key:
            with torch.no_grad(), torch.autocast(device_type=self.weight.device.type, enabled=False):
                compute_dtype = _compute_dtype(self.weight, self.state.target_inputs)
                targets, c_inv_targets, _, _, _ = self.state.gating_tensors(self.weight.device, compute_dtype)
                weight = self.weight.detach().to(compute_dtype)
                edited = weight - project_onto_targets(weight, c_inv_targets, targets)
            self._edited_weight = (key, edited.to(dtype))
        return self._edited_weight[1]

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        state = self.state
        if not state.enabled or state.num_concepts == 0:
            return F.linear(e, self.weight)
        if self.role == "key" and state.global_locking is not None:
            return F.linear(state.global_locking.key_input(e), self.weight)
        if state.num_concepts != self.num_concepts:
            raise RuntimeError(f"EditState has {state.num_concepts} concept(s) but this {self.role} layer holds "
                               f"{self.num_concepts} target output(s); call set_target_outputs / "
                               f"initialize_targets with one row per concept")
        compute_dtype = _compute_dtype(e, state.target_inputs)
        _, c_inv_targets, beta, tau, energies = state.gating_tensors(e.device, compute_dtype)
        # Mixed-precision training would run the gate's small matmul in half precision; the gate divides
        # by the energy and is sharp (tau = 0.1), so keep it in float32.
        autocasting = torch.is_autocast_enabled(e.device.type)
        with torch.autocast(device_type=e.device.type, enabled=False) if autocasting else contextlib.nullcontext():
            gate = concept_gate(similarity(e.to(compute_dtype), c_inv_targets), energies, beta, tau)
        autocast_dtype = torch.get_autocast_dtype(e.device.type) if autocasting else e.dtype
        base = F.linear(e, self.edited_weight(autocast_dtype))
        # base + gate o*, as one fused multiply-add (one kernel fewer per layer, which counts at small batches on a GPU)
        out = torch.addmm(base.reshape(-1, base.shape[-1]), gate.to(base.dtype).reshape(-1, gate.shape[-1]),
                          self.target_output.to(device=base.device, dtype=base.dtype))
        return out.view(base.shape)


# ---------------------------------------------------------------------------------------------
# UNet surgery
# ---------------------------------------------------------------------------------------------

def _is_cross_attention(name: str, module: nn.Module) -> bool:
    flag = getattr(module, "is_cross_attention", None)
    if flag is not None:
        return bool(flag)
    return name.endswith("attn2") and hasattr(module, "to_k") and hasattr(module, "to_v")


def swap_cross_attention_projections(unet: nn.Module, state: EditState, num_concepts: int = 1,
                                     trainable_keys: bool = False) -> "OrderedDict[str, RankOneEditLinear]":
    """Replace to_k (role "key") and to_v (role "value") of every cross-attention of ``unet``.

    ``trainable_keys``: the key layers' o*_K are parameters (trained like o*_V) instead of locked buffers.

    Cross-attention modules are those with ``is_cross_attention`` True (fallback: named ``...attn2``).
    Weights are kept as-is.  Idempotent: already-swapped projections are kept (they must share
    ``state``).  Returns {module name, e.g. "...attn2.to_v": layer} in module order.
    """
    swapped: "OrderedDict[str, RankOneEditLinear]" = OrderedDict()
    attention_modules = [(n, m) for n, m in unet.named_modules() if _is_cross_attention(n, m)]
    if not attention_modules:
        raise ValueError(f"{type(unet).__name__} has no cross-attention modules (is_cross_attention / "
                         f"'attn2'); is this a text-conditioned UNet?")
    for name, module in attention_modules:
        for attribute, role in (("to_k", "key"), ("to_v", "value")):
            projection = getattr(module, attribute)
            full_name = f"{name}.{attribute}" if name else attribute
            if isinstance(projection, RankOneEditLinear):
                if projection.state is not state:
                    raise ValueError(f"{full_name} is already swapped with a different EditState; all edited "
                                     f"layers of a UNet must share one state")
                layer = projection
            else:
                layer = RankOneEditLinear(projection, role, state, num_concepts,
                                          trainable=role == "value" or trainable_keys)
                setattr(module, attribute, layer)
            swapped[full_name] = layer
    return swapped


def edited_layers(unet: nn.Module, role: Optional[str] = None) -> "OrderedDict[str, RankOneEditLinear]":
    """{name: layer} for every RankOneEditLinear in ``unet`` (optionally only one role)."""
    if role is not None and role not in ROLES:
        raise ValueError(f"role must be one of {ROLES} or None, got {role!r}")
    return OrderedDict((n, m) for n, m in unet.named_modules()
                       if isinstance(m, RankOneEditLinear) and (role is None or m.role == role))
