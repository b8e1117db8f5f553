"""Small helpers shared by the sgm modules (kept local so sgm does not depend on ldm)."""
import importlib
import inspect
from collections.abc import Mapping
from typing import Any, Optional

import torch


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Import "package.module.Name" and return the named object."""
    if not isinstance(string, str) or "." not in string:
        raise ValueError(f"Expected a dotted import path like 'package.module.Class', got {string!r}.")
    module_name, obj_name = string.rsplit(".", 1)
    module = importlib.import_module(module_name)
    if reload:
        module = importlib.reload(module)
    if not hasattr(module, obj_name):
        raise AttributeError(f"Module '{module_name}' has no attribute '{obj_name}' (from target {string!r}).")
    return getattr(module, obj_name)


def instantiate_from_config(config: Mapping) -> Any:
    """Build `target(**params)` from a mapping {"target": "dotted.path", "params": {...}}.

    OmegaConf DictConfigs are accepted; their params are converted to plain containers so
    that nested "*_config" entries arrive as dicts.
    """
    if not isinstance(config, Mapping):
        try:  # omegaconf.DictConfig is not a collections.abc.Mapping in every version
            from omegaconf import DictConfig, OmegaConf

            if isinstance(config, DictConfig):
                config = OmegaConf.to_container(config, resolve=True)
        except ImportError:
            pass
    if not isinstance(config, Mapping):
        raise TypeError(f"Expected a config mapping with a 'target' key, got {type(config).__name__}.")
    if "target" not in config:
        raise KeyError(
            f"Config is missing the 'target' key (found keys {sorted(config)}); "
            "write it as {'target': 'package.module.Class', 'params': {...}}."
        )
    params = config.get("params") or {}
    if not isinstance(params, Mapping):
        try:
            from omegaconf import OmegaConf

            params = OmegaConf.to_container(params, resolve=True)
        except Exception:  # noqa: BLE001 - reported below with the target name
            pass
    if not isinstance(params, Mapping):
        raise TypeError(f"'params' of {config['target']!r} must be a mapping, got {type(params).__name__}.")
    return get_obj_from_str(config["target"])(**dict(params))


def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """Append trailing singleton dimensions so that `x` has `target_dims` dimensions."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"Input has {x.ndim} dims but target_dims is {target_dims}, which is fewer.")
    return x[(...,) + (None,) * dims_to_append]


def default(val: Optional[Any], d: Any) -> Any:
    """`val` unless it is None, else `d` (called when it is a function, so defaults can be lazy)."""
    if val is not None:
        return val
    return d() if inspect.isfunction(d) else d
