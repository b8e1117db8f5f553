"""Wrap a network (eps-, v- or EDM-parameterised) into a denoiser D(x, sigma) -> x0 estimate."""
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ...util import append_dims, instantiate_from_config

# network(scaled_input, c_noise, cond) -> raw prediction, e.g. LatentDiffusion.apply_model
Network = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


class Denoiser(nn.Module):
    """x0_hat = network(x * c_in, c_noise, cond) * c_out + x * c_skip, with continuous sigma."""

    def __init__(self, scaling_config: Mapping):
        super().__init__()
        self.scaling = instantiate_from_config(scaling_config)

    def possibly_quantize_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma

    def possibly_quantize_c_noise(self, c_noise: torch.Tensor) -> torch.Tensor:
        return c_noise

    def forward(self, network: Network, input: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=input.device)
        if sigma.ndim == 0:  # one noise level for the whole batch
            sigma = sigma.expand(input.shape[0])
        if sigma.shape != (input.shape[0],):
            raise ValueError(f"sigma must have shape (batch,) = ({input.shape[0]},), got {tuple(sigma.shape)}.")
        sigma = self.possibly_quantize_sigma(sigma)
        sigma_shape = sigma.shape
        sigma = append_dims(sigma, input.ndim)
        c_skip, c_out, c_in, c_noise = self.scaling(sigma)
        c_noise = self.possibly_quantize_c_noise(c_noise.reshape(sigma_shape))
        return network(input * c_in, c_noise, cond) * c_out + input * c_skip


class DiscreteDenoiser(Denoiser):
    """Denoiser for networks trained on discrete timesteps (SD): sigma snaps to the nearest training
    sigma, and the network receives that timestep's index (0 = least noise) as its time input."""

    def __init__(
        self,
        scaling_config: Mapping,
        num_idx: int = 1000,
        discretization_config: Mapping = None,
        do_append_zero: bool = False,
        quantize_c_noise: bool = True,
        flip: bool = True,
    ):
        super().__init__(scaling_config)
        if discretization_config is None:
            discretization_config = {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}
        discretization = instantiate_from_config(discretization_config)
        # flip=True puts them in ascending order so that position == DDPM timestep index.
        sigmas = discretization(num_idx, do_append_zero=do_append_zero, flip=flip)
        self.register_buffer("sigmas", sigmas, persistent=False)
        self.quantize_c_noise = quantize_c_noise
        self.num_idx = num_idx

    def sigma_to_idx(self, sigma: torch.Tensor) -> torch.Tensor:
        sigmas = self.sigmas.to(sigma.device)
        # A batch usually shares one or two noise levels: search only the distinct values.
        values, inverse = torch.unique(sigma.reshape(-1), return_inverse=True)
        nearest = (values[None, :] - sigmas[:, None]).abs().argmin(dim=0)
        return nearest[inverse].view(sigma.shape)

    def idx_to_sigma(self, idx: torch.Tensor) -> torch.Tensor:
        return self.sigmas.to(idx.device)[idx]

    def possibly_quantize_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.idx_to_sigma(self.sigma_to_idx(sigma))

    def possibly_quantize_c_noise(self, c_noise: torch.Tensor) -> torch.Tensor:
        return self.sigma_to_idx(c_noise) if self.quantize_c_noise else c_noise
