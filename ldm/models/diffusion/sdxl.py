"""Stable Diffusion XL base as a LatentDiffusion: the original checkpoint layout (``sd_xl_base_1.0.safetensors``).

``model.diffusion_model.*`` (the UNet, with the vector condition ``y``), ``first_stage_model.*`` (the VAE, latent
scale 0.13025) and ``conditioner.embedders.{0,1}.*`` (CLIP ViT-L and OpenCLIP ViT-bigG). The conditioning stage is
``SDXLConditioner``; it lives under the original name ``conditioner``, and ``cond_stage_model`` names the same
module, so code written for LatentDiffusion (``get_learned_conditioning``, the samplers) works unchanged. The
conditioning is a dict ``{"crossattn": context, "vector": y}``, which ``apply_model`` takes apart.

The first stage runs in float32 with autocast off (``encode_first_stage`` / ``decode_first_stage``): the original
SD XL VAE overflows in float16, so 16-mixed training and fp16 generation keep it out of half precision.

This is the base model's inference path; Perfusion on SD XL (training and generation) is
``perfusion.perfusion.PerfusionXL``. Training the base model itself is not supported.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import CheckpointError

# Buffers of the noise schedule: SD XL checkpoints do not hold them, the model computes them from the config.
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights")


class LatentDiffusionXL(LatentDiffusion):
    """SD XL base (``configs/stable-diffusion/sdxl-base.yaml``): ``cond_stage_config`` builds the conditioner."""

    BACKBONE_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "conditioner.")
    # Constants some SD XL files may carry and the model rebuilds: CLIP's position ids (a persistent buffer in the
    # transformers version the original code used) and the sampler's sigma table of the original DiffusionEngine.
    IGNORED_CHECKPOINT_KEYS = ("conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
                               "denoiser.sigmas")

    def __init__(self, *args, **kwargs):
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", ())
        if kwargs.get("cond_stage_trainable", False):
            raise NotImplementedError("training SD XL's text encoders is not supported (cond_stage_trainable)")
        if kwargs.get("conditioning_key", "crossattn") != "crossattn":
            raise ValueError("SD XL is conditioned by cross-attention (and the vector y): conditioning_key crossattn")
        super().__init__(*args, **kwargs)
        # the original name of the conditioning stage; cond_stage_model (a property) names the same module
        self.conditioner = self._modules.pop("cond_stage_model")
        for name in SCHEDULE_BUFFERS:
            self.register_buffer(name, self._buffers.pop(name), persistent=False)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)
            self.restarted_from_ckpt = True

    @property
    def cond_stage_model(self):
        modules = self.__dict__["_modules"]
        return modules["conditioner"] if "conditioner" in modules else modules["cond_stage_model"]

    def init_from_ckpt(self, path: str, ignore_keys=(), only_model: bool = False):
        from ldm.diffusers_format import is_diffusers_folder

        if is_diffusers_folder(path):
            raise CheckpointError(f"{path}: SD XL diffusers folders are not supported; use the original single file "
                                  "sd_xl_base_1.0.safetensors")
        return super().init_from_ckpt(path, ignore_keys=ignore_keys, only_model=only_model)

    def get_learned_conditioning(self, c, force_zero_text: bool = False) -> dict[str, torch.Tensor]:
        """Prompts, or a dict with ``txt`` and the size keys -> ``{"crossattn", "vector"}`` (see SDXLConditioner)."""
        return self.conditioner.encode(c, force_zero_text=force_zero_text)

    def apply_model(self, x_noisy, t, cond):
        if not isinstance(cond, Mapping) or not {"crossattn", "vector"} <= set(cond):
            raise TypeError("SD XL's conditioning is a dict with 'crossattn' and 'vector' (get_learned_conditioning "
                            f"gives it), got {type(cond).__name__}")
        return self.model(x_noisy, t, c_crossattn=[cond["crossattn"]], y=cond["vector"])

    @torch.no_grad()
    def encode_first_stage(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return super().encode_first_stage(x.float())

    def decode_first_stage(self, z):
        with torch.autocast(z.device.type, enabled=False):
            return super().decode_first_stage(z.float())

    def shared_step(self, batch):
        raise NotImplementedError("training the SD XL base model is not supported; Perfusion trains on it "
                                  "(perfusion.perfusion.PerfusionXL, configs/perfusion_teddy_sdxl.yaml)")
