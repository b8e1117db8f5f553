"""Noise-level schedules: turn a step count into a descending list of sigmas ending in 0.

sigma is the noise level of the variance-exploding view x = x0 + sigma * eps; for a DDPM
schedule sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t).
"""
from abc import ABC, abstractmethod

import numpy as np
import torch


def scaled_linear_alphas_cumprod(linear_start: float, linear_end: float, num_timesteps: int) -> np.ndarray:
    """alpha_bar_t of Stable Diffusion's "scaled linear" beta schedule (float64, length num_timesteps)."""
    betas = np.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def generate_roughly_equally_spaced_steps(num_substeps: int, max_step: int) -> np.ndarray:
    """Ascending integer timesteps, `num_substeps` of them, always including max_step - 1."""
    return np.linspace(max_step - 1, 0, num_substeps, endpoint=False).astype(int)[::-1]


class Discretization(ABC):
    """Base class: `__call__` returns sigmas in descending order with the final sigma (0, unless the
    discretization says otherwise) appended."""

    def __call__(self, n: int, device="cpu", do_append_zero: bool = True, flip: bool = False) -> torch.Tensor:
        if int(n) != n or n < 1:
            raise ValueError(f"Number of sigmas must be a positive integer, got {n!r}.")
        sigmas = self.get_sigmas(int(n), device=device)
        if do_append_zero:
            sigmas = torch.cat([sigmas, sigmas.new_full((1,), self.final_sigma())])
        return sigmas.flip(0) if flip else sigmas

    def final_sigma(self) -> float:
        """Where sampling ends: 0 (the data), unless a discretization stops at a trained noise level."""
        return 0.0

    @abstractmethod
    def get_sigmas(self, n: int, device="cpu") -> torch.Tensor:
        """n sigmas, descending, float32."""


def sigmas_of(alphas_cumprod: np.ndarray) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), from float64 to float32 once, the same way everywhere, so
    that sigma <-> timestep lookups (DiscreteDenoiser) are exact."""
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    return torch.tensor(((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5, dtype=torch.float32)


class LegacyDDPMDiscretization(Discretization):
    """A discrete DDPM training schedule (SD 1.x/2.x's scaled-linear one unless ``alphas_cumprod`` is given,
    e.g. a model's own cosine schedule), subsampled to n evenly spaced timesteps."""

    def __init__(self, linear_start: float = 0.00085, linear_end: float = 0.0120, num_timesteps: int = 1000,
                 alphas_cumprod=None):
        if alphas_cumprod is None:
            alphas_cumprod = scaled_linear_alphas_cumprod(linear_start, linear_end, int(num_timesteps))
        self.alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        self.num_timesteps = len(self.alphas_cumprod)

    def timesteps(self, n: int) -> np.ndarray:
        """The ascending DDPM timestep indices whose sigmas `get_sigmas(n)` returns (reversed)."""
        if n > self.num_timesteps:
            raise ValueError(f"Cannot take {n} steps from a schedule of {self.num_timesteps} timesteps.")
        if n == self.num_timesteps:
            return np.arange(self.num_timesteps)
        return generate_roughly_equally_spaced_steps(n, self.num_timesteps)

    def get_sigmas(self, n: int, device="cpu") -> torch.Tensor:
        return sigmas_of(self.alphas_cumprod[self.timesteps(n)]).to(device).flip(0)


class LeadingDDPMDiscretization(LegacyDDPMDiscretization):
    """The timesteps of the original DDIM and PLMS samplers: 'leading' spacing shifted by one
    (t = 1, 1 + T/n, 1 + 2T/n, ...; diffusers' timestep_spacing="leading", steps_offset=1), ending at
    alpha_bar_0's noise level rather than at 0 (diffusers' set_alpha_to_one=False)."""

    def timesteps(self, n: int) -> np.ndarray:
        if not 0 < n < self.num_timesteps:  # shifted by +1, so n = T would step past the schedule
            raise ValueError(f"steps must be between 1 and {self.num_timesteps - 1}, got {n}")
        stride = self.num_timesteps // n
        return np.arange(0, self.num_timesteps, stride)[:n] + 1

    def final_sigma(self) -> float:
        return float(sigmas_of(self.alphas_cumprod[:1])[0])


class EDMDiscretization(Discretization):
    """Karras et al. (2022) schedule: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"Need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.rho = rho

    def get_sigmas(self, n: int, device="cpu") -> torch.Tensor:
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        min_inv_rho = self.sigma_min ** (1 / self.rho)
        max_inv_rho = self.sigma_max ** (1 / self.rho)
        sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** self.rho
        return sigmas.to(device=device, dtype=torch.float32)
