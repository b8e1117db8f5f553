"""Small utilities shared by the backbone: config instantiation and safe checkpoint loading."""
from __future__ import annotations

import importlib
import os
import pickle
import zipfile
from typing import Any, Mapping

import torch


def exists(x) -> bool:
    return x is not None


def default(value, fallback):
    if value is not None:
        return value
    return fallback() if callable(fallback) else fallback


def get_obj_from_str(path: str, reload: bool = False):
    """Return the object named by a dotted path, e.g. ``ldm.models.autoencoder.AutoencoderKL``."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"'{path}' is not a dotted path of the form package.module.Object")
    module = importlib.import_module(module_name)
    if reload:
        module = importlib.reload(module)
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise ImportError(f"module '{module_name}' has no attribute '{attr}' (from target '{path}')") from err


def instantiate_from_config(config: Mapping[str, Any] | Any, **extra_kwargs):
    """Build ``target(**params)`` from a ``{target: ..., params: {...}}`` mapping (dict or OmegaConf)."""
    if isinstance(config, str) or not hasattr(config, "get"):
        raise TypeError(f"expected a config mapping with a 'target' key, got {type(config).__name__}: {config!r}")
    if "target" not in config:
        raise KeyError(f"config has no 'target' key (found keys {sorted(config)}); write it as "
                       "{target: package.module.Class, params: {...}}")
    params = config.get("params", None) or {}
    if not isinstance(params, dict):
        from omegaconf import OmegaConf

        params = OmegaConf.to_container(params, resolve=True)
    if not isinstance(params, Mapping):
        raise TypeError(f"'params' of {config['target']!r} must be a mapping, got {type(params).__name__}")
    return get_obj_from_str(config["target"])(**params, **extra_kwargs)


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used as asked; the message says why and what to do."""


def load_state_dict(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load the tensors of a ``.ckpt``/``.pt``/``.pth`` or ``.safetensors`` file without executing code.

    Training checkpoints nest the weights under ``state_dict`` (Lightning) or ``model``; that level is removed.
    Pickles that need
    code execution (anything beyond tensors, containers and plain numbers) are refused, never executed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"checkpoint not found: {path}\n"
            "Download Stable Diffusion weights into ./ckpt/ (see README: 'Where to put weights')."
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device=str(map_location))
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it contains Python objects that would run code when unpickled "
            f"({str(err).splitlines()[0]}). Only tensor checkpoints are loaded. If you trust the file, convert "
            "it once to .safetensors (e.g. load it with weights_only=False in a separate script and save its "
            "state_dict with safetensors.torch.save_file)."
        ) from err
    except (RuntimeError, zipfile.BadZipFile, EOFError) as err:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {err}") from err
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Save tensors as ``.safetensors`` or as a Lightning-style ``.ckpt`` (``{"state_dict": ...}``)."""
    path = os.fspath(path)
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(tensors, path)
    else:
        torch.save({"state_dict": tensors}, path)


def load_model_from_config(config, ckpt: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """Build ``config.model`` and load an original-layout checkpoint into it (the user-facing path).

    ``config`` is the whole OmegaConf/dict config (with a ``model`` entry) or the model entry itself.
    """
    model_config = config["model"] if "model" in config else config
    model = instantiate_from_config(model_config)
    if ckpt is not None:
        model.init_from_ckpt(os.fspath(ckpt))
    return model.to(device).eval()
