"""Read the tensors of a TorchScript archive (e.g. OpenAI's ViT-B-16.pt) without executing anything from it.

`torch.jit.load` compiles and runs the archive's code and `torch.load(weights_only=True)` refuses TorchScript
archives, so this reads `data.pkl` with an unpickler that only knows how to build tensors, ordered dicts and
opaque placeholders for scripted modules; any other global in the pickle is refused.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile

import torch

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptedObject:
    """Placeholder for a scripted module/class instance: keeps its attribute dict and nothing else."""

    attributes: dict = {}  # replaced (never mutated) by __setstate__; pickle's NEWOBJ skips __init__

    def __init__(self, *args) -> None:
        self.attributes = {}

    def __setstate__(self, state) -> None:
        self.attributes = state if isinstance(state, dict) else {}


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return storage.as_strided(tuple(size), tuple(stride), storage_offset)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _identity_list(values):
    return list(values)


def _restore_type_tag(value, type_string):
    return value


def _device_name(*args):
    return str(args[0]) if args else "cpu"


_ALLOWED_GLOBALS = {
    ("torch", "device"): _device_name,  # device-typed attributes: kept as plain strings
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "build_intlist"): _identity_list,
    ("torch.jit._pickle", "build_doublelist"): _identity_list,
    ("torch.jit._pickle", "build_boollist"): _identity_list,
    ("torch.jit._pickle", "build_tensorlist"): _identity_list,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, data_prefix: str, source: str) -> None:
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._data_prefix = data_prefix
        self._source = source
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):  # scripted classes: data only, their code is never run
            return _ScriptedObject
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(
            f"{self._source}: refusing to load global '{module}.{name}' from a TorchScript archive (only tensors "
            "and module attributes are read). Convert the file to a plain state dict or safetensors instead."
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"{self._source}: unsupported persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"{self._source}: unsupported storage type {storage_type!r}")
        if key not in self._storages:
            raw = bytearray(self._archive.read(f"{self._data_prefix}{key}"))
            self._storages[key] = (
                torch.frombuffer(raw, dtype=storage_type.dtype) if raw else torch.empty(0, dtype=storage_type.dtype)
            )
        return self._storages[key]


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """True for a zip archive written by torch.jit.save (it carries compiled code next to data.pkl)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(name.endswith("/constants.pkl") or "/code/" in name for name in names)


def read_torchscript_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Dotted-name -> tensor for every tensor attribute of the scripted module tree (parameters and buffers)."""
    source = os.fspath(path)
    with zipfile.ZipFile(source) as archive:
        pickles = sorted((name for name in archive.namelist() if name.endswith("/data.pkl")), key=len)
        if not pickles:
            raise ValueError(f"{source}: no data.pkl inside; not a TorchScript archive.")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = f"{prefix}byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() not in (b"", b"little"):
            raise ValueError(f"{source}: big-endian TorchScript archives are not supported.")
        root = _RestrictedUnpickler(archive.read(pickles[0]), archive, f"{prefix}data/", source).load()
    if not isinstance(root, _ScriptedObject):
        raise ValueError(f"{source}: the archive's root object is not a scripted module.")
    tensors: dict[str, torch.Tensor] = {}
    _collect_tensors(root, "", tensors, set())
    return {name: tensor.clone() for name, tensor in tensors.items()}  # detach from the shared raw buffers


def _collect_tensors(node: _ScriptedObject, prefix: str, out: dict, visited: set) -> None:
    if id(node) in visited:
        return
    visited.add(id(node))
    for name, value in node.attributes.items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptedObject):
            _collect_tensors(value, f"{prefix}{name}.", out, visited)
