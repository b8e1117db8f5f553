"""The KL-regularised autoencoder that maps images to SD latents and back."""
from __future__ import annotations

import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import accepted_parameters, check_config_keys, load_state_dict

DDCONFIG_KEYS = accepted_parameters(Encoder) | accepted_parameters(Decoder)


class AutoencoderKL(nn.Module):
    """Inference-side SD VAE. ``lossconfig`` is accepted for config compatibility; training the VAE is out of scope."""

    UNUSED_CONFIG_KEYS = {
        "lossconfig": "the VAE is used frozen; training it is out of scope",
        "monitor": "the VAE is used frozen; training it is out of scope",
        "colorize_nlabels": "segmentation inputs are not supported",
        "image_key": "the VAE is used frozen; the diffusion model's first_stage_key picks the images",
    }

    def __init__(self, ddconfig: dict, embed_dim: int, ckpt_path: str | None = None, ignore_keys=()):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true (mean and log-variance)")
        self.embed_dim = embed_dim
        check_config_keys("AutoencoderKL ddconfig", ddconfig, DDCONFIG_KEYS)
        self.encoder = Encoder(**{k: v for k, v in ddconfig.items() if k not in ("give_pre_end", "tanh_out")})
        self.decoder = Decoder(**{k: v for k, v in ddconfig.items() if k != "double_z"})
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        if ckpt_path is not None:
            state = {k: v for k, v in load_state_dict(ckpt_path).items()
                     if not any(k.startswith(p) for p in ignore_keys)}
            self.load_state_dict(state, strict=False)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True):
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class IdentityFirstStage(nn.Module):
    """Pixel-space diffusion: the 'autoencoder' passes tensors through."""

    def __init__(self, *args, vq_interface: bool = False, **kwargs):
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x, *args, **kwargs):
        return x

    def decode(self, x, *args, **kwargs):
        return x

    def forward(self, x, *args, **kwargs):
        return x
