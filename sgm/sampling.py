"""Glue between a diffusion model (LatentDiffusion: its apply_model, noise schedule and parameterization) and the
sgm samplers; every sampler of the project, DDIM and PLMS included, runs through here."""
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


SAMPLING = "sgm.modules.diffusionmodules."
SAMPLERS = {"ddim": SAMPLING + "sampling.DDIMSampler", "plms": SAMPLING + "sampling.PLMSSampler"}


def schedule_of(model) -> list[float]:
    """The model's alpha_bar_t (float64 values of its buffer), the schedule every discretization of it uses."""
    return model.alphas_cumprod.detach().double().cpu().tolist()


def denoiser_for(model) -> Denoiser:
    """D(x, sigma) for the model: its parameterization's scaling and its own discrete training schedule."""
    if model.parameterization not in SCALING_FOR_PARAMETERIZATION:
        raise ValueError(f"parameterization must be one of {sorted(SCALING_FOR_PARAMETERIZATION)}, "
                         f"got {model.parameterization!r}.")
    schedule = schedule_of(model)
    return instantiate_from_config({
        "target": SAMPLING + "denoiser.DiscreteDenoiser",
        "params": {"scaling_config": {"target": SCALING_FOR_PARAMETERIZATION[model.parameterization]},
                   "num_idx": len(schedule),
                   "discretization_config": {"target": SAMPLING + "discretizer.LegacyDDPMDiscretization",
                                             "params": {"alphas_cumprod": schedule}}}}).to(model.device)


def guider_config(scale: float) -> dict:
    """Classifier-free guidance at ``scale``; 1 means the conditional prediction alone (one batch, not two)."""
    if scale == 1.0:
        return {"target": SAMPLING + "guiders.IdentityGuider"}
    return {"target": SAMPLING + "guiders.VanillaCFG", "params": {"scale": scale}}


def original_sampler(model, name: str = "ddim", steps: int = 50, scale: float = 1.0, eta: float = 0.0,
                     verbose: bool = False):
    """DDIM (any eta) or PLMS on the original 'leading, +1' timesteps of the model's schedule."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}")
    params = {"num_steps": steps, "verbose": verbose, "device": str(model.device),
              "guider_config": guider_config(scale),
              "discretization_config": {"target": SAMPLING + "discretizer.LeadingDDPMDiscretization",
                                        "params": {"alphas_cumprod": schedule_of(model)}}}
    if name == "ddim":
        params["eta"] = eta
    elif eta != 0:
        raise ValueError("PLMS is deterministic: eta must be 0")
    return instantiate_from_config({"target": SAMPLERS[name], "params": params})


@torch.no_grad()
def sample(model, cond: Any, x_T: torch.Tensor, uc: Any = None, sampler=None, denoiser: Denoiser = None,
           generator: Optional[torch.Generator] = None, **sampler_kwargs) -> torch.Tensor:
    """Samples (in the model's latent space) from the noise x_T: ``sampler`` (default: ``original_sampler(model,
    **sampler_kwargs)``, i.e. DDIM) with ``denoiser`` (default ``denoiser_for(model)``) over ``model.apply_model``."""
    sampler = sampler if sampler is not None else original_sampler(model, **sampler_kwargs)
    denoiser = denoiser if denoiser is not None else denoiser_for(model)
    return sampler(make_denoiser_fn(denoiser, model.apply_model), x_T, cond, uc, generator=generator)


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
    alphas_cumprod: Optional[list] = None,
) -> Tuple[Any, Denoiser]:
    """Instantiate (sampler, denoiser) from yaml paths or dicts, with optional overrides.

    parameterization ("eps" or "v", i.e. model.parameterization) replaces an Eps/V scaling in the
    denoiser config that does not match the model, with a warning: a v-model (SD 2.1-768) denoised
    with EpsScaling gives noise. num_steps, guidance_scale (VanillaCFG scale), device and verbose
    override the sampler config's values when given. alphas_cumprod (``schedule_of(model)``) replaces the
    schedule of every DDPM discretization in both configs: the model's own training schedule.
    """
    sampler_cfg = _load_config(sampler_config, "sampler")
    denoiser_cfg = _load_config(denoiser_config, "denoiser")
    if alphas_cumprod is not None:
        for cfg in (sampler_cfg, denoiser_cfg):
            discretization = (cfg.get("params") or {}).get("discretization_config") or {}
            if str(discretization.get("target", "")).endswith(("LegacyDDPMDiscretization",
                                                                "LeadingDDPMDiscretization")):
                discretization["params"] = {"alphas_cumprod": list(alphas_cumprod)}

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
