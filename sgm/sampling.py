"""Glue between a diffusion network (e.g. LatentDiffusion.apply_model) and the sgm samplers."""
import copy
import os
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Optional, Tuple, Union

import torch

from .modules.diffusionmodules.denoiser import Denoiser, Network
from .util import instantiate_from_config

SCALING_FOR_PARAMETERIZATION = {
    "eps": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling",
    "v": "sgm.modules.diffusionmodules.denoiser_scaling.VScaling",
}


def make_denoiser_fn(denoiser: Denoiser, network: Network) -> Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]:
    """The 3-argument callable samplers expect: (x, sigma, cond) -> denoiser(network, x, sigma, cond)."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        return denoiser(network, x, sigma, cond)

    return denoise


def _load_config(config: Union[str, os.PathLike, Mapping], what: str) -> dict:
    if isinstance(config, (str, os.PathLike)):
        if not os.path.isfile(config):
            raise FileNotFoundError(f"{what} config file not found: {config} (see configs/{what}/{what}.yaml).")
        from omegaconf import OmegaConf

        config = OmegaConf.load(config)
    if not isinstance(config, Mapping):
        from omegaconf import DictConfig, OmegaConf

        if isinstance(config, DictConfig):
            config = OmegaConf.to_container(config, resolve=True)
    if not isinstance(config, Mapping):
        raise TypeError(f"{what} config must be a yaml path or a mapping, got {type(config).__name__}.")
    return copy.deepcopy(dict(config))


def build_sampler_and_denoiser(
    sampler_config: Union[str, os.PathLike, Mapping],
    denoiser_config: Union[str, os.PathLike, Mapping],
    parameterization: Optional[str] = None,
    num_steps: Optional[int] = None,
    guidance_scale: Optional[float] = None,
    device: Optional[str] = None,
    verbose: Optional[bool] = None,
) -> Tuple[Any, Denoiser]:
    """Instantiate (sampler, denoiser) from yaml paths or dicts, with optional overrides.

    parameterization ("eps" or "v", i.e. model.parameterization) replaces an Eps/V scaling in the
    denoiser config that does not match the model, with a warning: a v-model (SD 2.1-768) denoised
    with EpsScaling gives noise. num_steps, guidance_scale (VanillaCFG scale), device and verbose
    override the sampler config's values when given.
    """
    sampler_cfg = _load_config(sampler_config, "sampler")
    denoiser_cfg = _load_config(denoiser_config, "denoiser")

    if parameterization is not None:
        if parameterization not in SCALING_FOR_PARAMETERIZATION:
            raise ValueError(f"parameterization must be one of {sorted(SCALING_FOR_PARAMETERIZATION)}, "
                             f"got {parameterization!r}.")
        scaling_cfg = denoiser_cfg.setdefault("params", {}).get("scaling_config") or {}
        wanted = SCALING_FOR_PARAMETERIZATION[parameterization]
        current = scaling_cfg.get("target")
        if current in SCALING_FOR_PARAMETERIZATION.values() and current != wanted:
            warnings.warn(f"Denoiser scaling {current} does not match the model's '{parameterization}' "
                          f"parameterization; using {wanted} instead.")
            denoiser_cfg["params"]["scaling_config"] = {"target": wanted}

    params = sampler_cfg.setdefault("params", {})
    if num_steps is not None:
        params["num_steps"] = num_steps
    if device is not None:
        params["device"] = device
    if verbose is not None:
        params["verbose"] = verbose
    if guidance_scale is not None:
        guider_cfg = params.get("guider_config") or {}
        if not str(guider_cfg.get("target", "")).endswith("VanillaCFG"):
            raise ValueError("guidance_scale was given but the sampler config's guider_config is not VanillaCFG.")
        guider_cfg.setdefault("params", {})["scale"] = guidance_scale

    sampler = instantiate_from_config(sampler_cfg)
    denoiser = instantiate_from_config(denoiser_cfg)
    if device is not None:
        denoiser = denoiser.to(device)
    return sampler, denoiser
