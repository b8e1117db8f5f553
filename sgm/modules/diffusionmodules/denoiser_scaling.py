"""Preconditioning: how a network trained in one parameterisation yields a denoised x0.

All scalings use the variance-exploding input x = x0 + sigma * eps and return
(c_skip, c_out, c_in, c_noise) such that  x0_hat = c_skip * x + c_out * F(c_in * x, c_noise).
"""
from typing import Tuple

import torch

Scalings = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class EpsScaling:
    """F predicts eps from the DDPM input sqrt(abar) x0 + sqrt(1 - abar) eps = x / sqrt(1 + sigma^2)."""

    def __call__(self, sigma: torch.Tensor) -> Scalings:
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1.0) ** 0.5
        c_noise = sigma.clone()
        return c_skip, c_out, c_in, c_noise


class VScaling:
    """F predicts v = sqrt(abar) eps - sqrt(1 - abar) x0 (SD 2.x "v" models)."""

    def __call__(self, sigma: torch.Tensor) -> Scalings:
        c_skip = 1.0 / (sigma**2 + 1.0)
        c_out = -sigma / (sigma**2 + 1.0) ** 0.5
        c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
        c_noise = sigma.clone()
        return c_skip, c_out, c_in, c_noise


class EDMScaling:
    """Karras et al. (2022) preconditioning; c_noise is log-sigma, so do not quantize it to indices."""

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = sigma_data

    def __call__(self, sigma: torch.Tensor) -> Scalings:
        total = sigma**2 + self.sigma_data**2
        c_skip = self.sigma_data**2 / total
        c_out = sigma * self.sigma_data / total**0.5
        c_in = 1 / total**0.5
        c_noise = 0.25 * sigma.log()
        return c_skip, c_out, c_in, c_noise
