"""Small utilities shared by the backbone: config instantiation, safe checkpoint loading, atomic file writes."""
from __future__ import annotations

import difflib
import importlib
import inspect
import os
import pickle
import shutil
import sys
import uuid
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch


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


def one_line_warnings() -> None:
    """Command lines print each warning as one ``warning: ...`` line (not Python's two lines with the source)."""
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


def run_command(command, *args) -> int:
    """A command line's body: warnings as one line each; a UserError printed as ``error: ...`` with exit code 2
    (no traceback); any other error keeps its traceback."""
    one_line_warnings()
    try:
        return command(*args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


class UserError(Exception):
    """A problem with what the user gave (a file, a value, a config key). Command lines print the message (one or
    two lines that name the file or value and the fix) and exit with code 2; internal errors keep their traceback."""


class ConfigError(UserError, ValueError):
    """A config that cannot be used as written (unknown key, missing target, wrong type)."""


class BadValueError(UserError, ValueError):
    """A value or a file's content that cannot be used (an empty mask, a multi-token word, a C^-1 of the wrong
    size)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


# Packages whose constructors are checked against their signatures; a class of another package (torch, Lightning)
# that takes **kwargs ends the walk up the class hierarchy, and its parameters are not checked.
_PROJECT_PACKAGES = ("ldm", "perfusion", "sgm", "main", "__main__", "data", "scripts", "clipseg", "tests")
_warned_unused: set[tuple[str, str]] = set()
# What a ``{target, params}`` entry may hold besides them: the learning rates main.py reads from ``model``.
CONFIG_ENTRY_KEYS = {"target", "params", "base_learning_rate", "embedding_learning_rate", "target_output_learning_rate"}


def _is_project(obj) -> bool:
    return getattr(obj, "__module__", "").split(".")[0] in _PROJECT_PACKAGES


def accepted_parameters(target) -> set[str] | None:
    """Names ``target(...)`` accepts as keywords, following ``**kwargs`` of a class up to its parents;
    None when the set is open (a function or a non-project class that takes ``**kwargs``)."""
    names: set[str] = set()
    chain = [k for k in target.__mro__ if "__init__" in vars(k)] if inspect.isclass(target) else [target]
    for owner in chain:
        if owner is object or not _is_project(owner):
            return None  # **kwargs that go somewhere this walk cannot see
        init = owner.__init__ if inspect.isclass(owner) else owner
        parameters = inspect.signature(init).parameters.values()
        names |= {p.name for p in parameters
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            return names
    return names


def unused_config_keys(target) -> dict[str, str]:
    """Keys of the original LDM configs that ``target`` accepts but deliberately does not use, with the reason:
    the union of the ``UNUSED_CONFIG_KEYS`` class attributes along the class hierarchy."""
    unused: dict[str, str] = {}
    for owner in reversed(getattr(target, "__mro__", ())):
        unused.update(vars(owner).get("UNUSED_CONFIG_KEYS", {}))
    return unused


def check_config_keys(owner: str, given, known, unused: Mapping[str, str] | None = None) -> list[str]:
    """Raise ConfigError for the first key of ``given`` that is neither known nor a deliberately unused key (with
    the closest known key as a suggestion); warn once per reason and key for unused ones. Returns the unused keys
    found, for the caller to drop."""
    unused = unused or {}
    known = set(known)
    dropped = []
    for key in given:
        if key in unused and key not in known:
            if (unused[key], key) not in _warned_unused:
                _warned_unused.add((unused[key], key))
                warnings.warn(f"{owner}: config key '{key}' is accepted but not used: {unused[key]}", UserWarning,
                              stacklevel=3)
            dropped.append(key)
        elif key not in known:
            close = difflib.get_close_matches(str(key), sorted(known | set(unused)), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"{owner}: unknown config key '{key}'; {hint}")
    return dropped


def _checked_entry(config, where: str, params_owner: str, extra=()):
    """The target of one ``{target, params}`` entry and the keys of its params to drop (deliberately unused ones);
    ConfigError for an unimportable target or an unknown key of the entry or of its params."""
    check_config_keys(where, list(config), CONFIG_ENTRY_KEYS)
    try:
        target = get_obj_from_str(str(config["target"]))
    except (ImportError, ValueError) as err:
        raise ConfigError(f"{where}.target: {err}") from err
    params = config.get("params") or {}
    known = accepted_parameters(target)
    if known is None or not hasattr(params, "keys"):
        return target, []
    return target, check_config_keys(params_owner, list(params.keys()), known | set(extra), unused_config_keys(target))


def validate_config(config, where: str = "config") -> None:
    """Check every ``{target, params}`` entry of a config tree (importable target, known keys) without building
    anything, so that a misspelt key fails in a second rather than after a model has loaded."""
    if hasattr(config, "items") and not isinstance(config, str):
        if "target" in config:
            _checked_entry(config, where, f"{where}.params ({config['target']})")
        for key, value in config.items():
            validate_config(value, f"{where}.{key}")
    elif isinstance(config, (list, tuple)) or type(config).__name__ == "ListConfig":
        for i, value in enumerate(config):
            validate_config(value, f"{where}[{i}]")


def instantiate_from_config(config: Mapping[str, Any] | Any, **extra_kwargs):
    """Build ``target(**params)`` from a ``{target: ..., params: {...}}`` mapping (dict or OmegaConf).

    Strict: a key the target does not take is a ConfigError naming it and the closest known key; keys of the
    original LDM configs that a class deliberately ignores (its ``UNUSED_CONFIG_KEYS``) are dropped with one
    warning each.
    """
    if isinstance(config, str) or not hasattr(config, "get"):
        raise ConfigError(f"expected a config mapping with a 'target' key, got {type(config).__name__}: {config!r}")
    if "target" not in config:
        raise ConfigError(f"config has no 'target' key (found keys {sorted(config)}); write it as "
                          "{target: package.module.Class, params: {...}}")
    params = config.get("params", None) or {}
    if not isinstance(params, dict):
        from omegaconf import OmegaConf

        params = OmegaConf.to_container(params, resolve=True) if OmegaConf.is_config(params) else params
    if not isinstance(params, Mapping):
        raise ConfigError(f"'params' of {config['target']!r} must be a mapping, got {type(params).__name__}")
    target, unused = _checked_entry(dict(config, params=params), f"config of {config['target']}",
                                    str(config["target"]), extra_kwargs)
    return target(**{k: v for k, v in params.items() if k not in unused}, **extra_kwargs)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that cannot be used as asked; the message says why and what to do."""


_MAGIC = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"GIF8": "a GIF image", b"RIFF": "a WebP image",
          b"%PDF": "a PDF document", b"<": "an HTML/XML page (a download error page?)", b"{": "a JSON file",
          b"\x93NUMPY": "a NumPy array (.npy)", b"version https://git-lfs": "a Git LFS pointer (run git lfs pull)"}


def _file_head(path: str | os.PathLike, size: int = 32) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(size)


def describe_file_kind(path: str | os.PathLike, head: bytes | None = None) -> str | None:
    """What a file that is not a checkpoint looks like, from its first bytes (None when it is not recognised)."""
    head = _file_head(path) if head is None else head
    if not head:
        return "an empty file"
    return next((kind for magic, kind in _MAGIC.items() if head.startswith(magic)), None)


def diagnose_safetensors(path: str | os.PathLike) -> str:
    """Why a ``.safetensors`` file cannot be read: incomplete (its header declares more bytes than the file has),
    another kind of file, or a corrupt header. Names the file and the fix."""
    import json
    import struct

    path = os.fspath(path)
    size = os.path.getsize(path)
    kind = describe_file_kind(path)
    if kind is not None:
        return f"{path} is not a safetensors file: it is {kind}"
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return f"{path} is {size} bytes: an incomplete download or not a safetensors file; download it again"
        header_length = struct.unpack("<Q", prefix)[0]
        if header_length > 100_000_000:
            return f"{path} is not a safetensors file (its first bytes are {prefix!r})"
        if 8 + header_length > size:
            return (f"{path} is incomplete: its header alone declares {8 + header_length:,} bytes but the file has "
                    f"{size:,}; download it again")
        try:
            header = json.loads(handle.read(header_length))
        except ValueError:
            return f"{path} is not a safetensors file, or its header is corrupt"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    declared = 8 + header_length + max(ends, default=0)
    if declared > size:
        return (f"{path} is incomplete: {size:,} of the {declared:,} bytes its header declares "
                f"({100 * size / declared:.0f} %); the download was cut short, download it again")
    return f"{path} is a damaged safetensors file (size and header agree, but the tensors cannot be read)"


def load_state_dict(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load the tensors of a ``.ckpt``/``.pt``/``.pth`` or ``.safetensors`` file without executing code.

    A diffusers Stable Diffusion folder (``unet/``, ``vae/``, ``text_encoder/``) is read too, its weights renamed to
    the original checkpoint layout (``ldm.diffusers_format``).

    Training checkpoints nest the weights under ``state_dict`` (Lightning) or ``model``; that level is removed.
    Pickles that need
    code execution (anything beyond tensors, containers and plain numbers) are refused, never executed.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        from ldm.diffusers_format import diffusers_folder_problem, is_diffusers_folder, load_diffusers_folder

        if is_diffusers_folder(path):
            return load_diffusers_folder(path)
        raise CheckpointError(diffusers_folder_problem(path) or f"{path} is a folder, not a checkpoint")
    if not os.path.isfile(path):
        raise MissingFileError(
            f"checkpoint not found: {path}\n"
            "Download Stable Diffusion weights into ./ckpt/ (see README: 'Where to put weights')."
        )
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device=str(map_location))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(diagnose_safetensors(path)) from err
    head = _file_head(path)
    kind = describe_file_kind(path, head)
    if kind is not None:
        raise CheckpointError(f"{path} is not a checkpoint: it is {kind}")
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CheckpointError(f"{path} is neither a PyTorch checkpoint nor a .safetensors file (it starts with "
                              f"{head[:8]!r})")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "global" in line),
                      "objects beyond tensors")
        raise CheckpointError(
            f"refusing to load {path}: it contains Python objects that would run code when unpickled "
            f"({reason}). Only tensor checkpoints are loaded. If you trust the file, convert "
            "it once to .safetensors (e.g. load it with weights_only=False in a separate script and save its "
            "state_dict with safetensors.torch.save_file)."
        ) from err
    except (RuntimeError, zipfile.BadZipFile, EOFError) as err:
        if head.startswith(b"PK\x03\x04"):
            raise CheckpointError(f"{path} is an incomplete or damaged PyTorch checkpoint "
                                  f"({os.path.getsize(path):,} bytes; {str(err).splitlines()[0]}); download it "
                                  "again") from err
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({str(err).splitlines()[0]})") from err
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Create ``path`` all at once: ``write(temporary)`` makes a file (or a folder) at a hidden temporary sibling
    path, which is then renamed onto ``path`` with ``os.replace``.

    Readers see the old content or the new one, never a half-written file, and an interrupted run leaves no
    ``path``. A file is flushed to disk (fsync) before the rename. When ``write`` or the rename fails the temporary
    is removed and the error propagates (renaming a folder onto a non-empty folder is an OSError). The parent
    folder is created. Returns ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(temporary)
        if temporary.is_file():
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)
        raise
    return path


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

    ``config`` is the whole OmegaConf/dict config (with a ``model`` entry) or the model entry itself. The weights
    come from ``ckpt`` alone: the config's ``model.params.ckpt_path`` is not loaded (``config`` is not changed).
    """
    from omegaconf import OmegaConf

    model_config = config["model"] if "model" in config else config
    if OmegaConf.is_config(model_config):
        model_config = OmegaConf.to_container(model_config, resolve=True)
    params = {k: v for k, v in (model_config.get("params") or {}).items() if k != "ckpt_path"}
    model = instantiate_from_config({**model_config, "params": params})
    if ckpt is not None:
        model.init_from_ckpt(os.fspath(ckpt))
    return model.to(device).eval()
