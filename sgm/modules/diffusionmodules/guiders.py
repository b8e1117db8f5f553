"""Guiders: how conditional and unconditional predictions are batched and combined."""
from collections.abc import Mapping
from typing import Any, Tuple

import torch


def concat_uncond_cond(uc: Any, c: Any, path: str = "cond") -> Any:
    """Stack uncond before cond along the batch for every tensor in `c` (tensor, dict or list of them).

    Non-tensor leaves (None, flags, strings) are shared by both halves and must be equal.
    """
    if isinstance(c, torch.Tensor):
        if not isinstance(uc, torch.Tensor):
            raise TypeError(f"{path}: cond is a tensor but uncond is {type(uc).__name__}; give both as tensors.")
        if c.ndim == 0:
            if not torch.equal(uc, c):
                raise ValueError(f"{path}: scalar tensors of cond and uncond differ; they cannot be batched.")
            return c
        if uc.shape != c.shape:
            raise ValueError(f"{path}: uncond shape {tuple(uc.shape)} differs from cond shape {tuple(c.shape)}.")
        return torch.cat([uc, c], dim=0)
    if isinstance(c, Mapping):
        if not isinstance(uc, Mapping) or set(uc) != set(c):
            uc_keys = sorted(uc) if isinstance(uc, Mapping) else type(uc).__name__
            raise ValueError(f"{path}: uncond keys {uc_keys} must equal cond keys {sorted(c)}.")
        return {k: concat_uncond_cond(uc[k], c[k], f"{path}[{k!r}]") for k in c}
    if isinstance(c, (list, tuple)):
        if not isinstance(uc, (list, tuple)) or len(uc) != len(c):
            raise ValueError(f"{path}: uncond must be a sequence of the same length ({len(c)}) as cond.")
        return type(c)(concat_uncond_cond(u, v, f"{path}[{i}]") for i, (u, v) in enumerate(zip(uc, c)))
    if uc != c:
        raise ValueError(f"{path}: non-tensor entries must be equal in cond and uncond, got {uc!r} vs {c!r}.")
    return c


class VanillaCFG:
    """Classifier-free guidance: x_u + scale * (x_c - x_u), both halves from ONE network call."""

    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x_u, x_c = x.chunk(2)
        return x_u + self.scale * (x_c - x_u)

    def prepare_inputs(self, x: torch.Tensor, s: torch.Tensor, c: Any, uc: Any) -> Tuple[torch.Tensor, torch.Tensor, Any]:
        return torch.cat([x] * 2), torch.cat([s] * 2), concat_uncond_cond(uc, c)


class IdentityGuider:
    """No guidance: the conditional prediction only."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x

    def prepare_inputs(self, x: torch.Tensor, s: torch.Tensor, c: Any, uc: Any) -> Tuple[torch.Tensor, torch.Tensor, Any]:
        return x, s, c
