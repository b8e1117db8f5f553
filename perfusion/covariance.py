"""Reading and writing C^-1, the inverse uncentered covariance of text-encoder token encodings.

C = (1/N) sum e e^T over the real tokens (start token through EOS) of a caption corpus; make one with
``python data/estimate_C_inv.py``. A concept trained with one C^-1 must be used with the same one, so every
file carries a short content hash (``c_inv_hash``) that concept files can record and compare.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ldm.util import BadValueError, MissingFileError

HOW_TO_MAKE = (
    "Make one with: python data/estimate_C_inv.py --caption captions.txt --type clip "
    "--ckpt ckpt/v1-5-pruned-emaonly.ckpt --save_path ckpt/C_inv_sd1.npy "
    "(--type openclip with an SD 2.x checkpoint for SD 2.x)."
)
SYMMETRY_RTOL = 1e-5  # inverting in float32 leaves asymmetries around 1e-7 relative; anything larger is wrong


def _read_matrix(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as err:
            raise BadValueError(f"{path}: not a plain numeric .npy array ({err})") from err
    if suffix in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path))
    else:
        raise BadValueError(f"{path}: unsupported C^-1 file type '{suffix}' (use .npy, .pt or .safetensors)")
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if "c_inv" in tensors:
            obj = tensors["c_inv"]
        elif len(tensors) == 1:
            obj = next(iter(tensors.values()))
        else:
            raise BadValueError(f"{path}: expected one tensor (or a 'c_inv' key), found keys {sorted(obj)[:5]}")
    if not isinstance(obj, torch.Tensor):
        raise BadValueError(f"{path}: expected a tensor, found {type(obj).__name__}")
    return obj.detach().cpu().double().numpy()


def load_c_inv(path: str | os.PathLike, expected_dim: int | None = None) -> torch.Tensor:
    """Load C^-1 as a float64 (D, D) tensor from .npy, .pt or .safetensors.

    Checks: square, finite, symmetric (relative tolerance 1e-5; the result is exactly symmetrised),
    positive definite, and D == expected_dim when given. Errors name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"C^-1 file not found: {path}. {HOW_TO_MAKE}")
    matrix = np.asarray(_read_matrix(path), dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise BadValueError(f"{path}: C^-1 must be a square matrix, got shape {matrix.shape}")
    if expected_dim is not None and matrix.shape[0] != expected_dim:
        raise BadValueError(
            f"{path}: C^-1 is {matrix.shape[0]}x{matrix.shape[0]} but the text encoder has width {expected_dim} "
            "(768 for SD 1.x CLIP, 1024 for SD 2.x OpenCLIP). Use the file made for this text encoder."
        )
    if not np.isfinite(matrix).all():
        raise BadValueError(f"{path}: C^-1 contains NaN or infinite values. {HOW_TO_MAKE}")
    scale = np.abs(matrix).max()
    asym = np.abs(matrix - matrix.T).max()
    if asym > SYMMETRY_RTOL * scale:
        raise BadValueError(f"{path}: C^-1 is not symmetric (max |A - A^T| = {asym:.3g}, max |A| = {scale:.3g})")
    c_inv = torch.from_numpy(0.5 * (matrix + matrix.T))
    if torch.linalg.cholesky_ex(c_inv).info.item() != 0:
        raise BadValueError(f"{path}: C^-1 is not positive definite. {HOW_TO_MAKE}")
    return c_inv


def c_inv_hash(c_inv: torch.Tensor | np.ndarray) -> str:
    """First 16 hex digits of sha256 over the float64 little-endian bytes (row-major) of C^-1."""
    if isinstance(c_inv, torch.Tensor):
        c_inv = c_inv.detach().cpu().double().numpy()
    data = np.ascontiguousarray(np.asarray(c_inv, dtype="<f8"))
    return hashlib.sha256(data.tobytes()).hexdigest()[:16]


def save_c_inv(path: str | os.PathLike, c_inv: torch.Tensor | np.ndarray, meta: dict[str, Any]) -> Path:
    """Write C^-1 as float64 ``.npy`` plus a sidecar ``.json`` (meta + hash, condition number, dim).

    ``meta`` should hold at least ``encoder``, ``n_tokens`` and ``eps``. Returns the .npy path.
    """
    path = Path(path)
    if path.suffix.lower() != ".npy":
        raise BadValueError(f"{path}: C^-1 is saved as .npy; give a --save_path ending in .npy")
    if isinstance(c_inv, torch.Tensor):
        c_inv = c_inv.detach().cpu().double().numpy()
    matrix = np.asarray(c_inv, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or not np.isfinite(matrix).all():
        raise BadValueError(f"refusing to save {path}: C^-1 must be a finite square matrix, got shape {matrix.shape}")
    matrix = np.ascontiguousarray(0.5 * (matrix + matrix.T), dtype="<f8")  # what load_c_inv returns, bit for bit
    eigenvalues = np.linalg.eigvalsh(matrix)
    if eigenvalues[0] <= 0:
        raise BadValueError(f"refusing to save {path}: C^-1 is not positive definite (min eigenvalue {eigenvalues[0]:.3g})")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, matrix, allow_pickle=False)
    info = {
        **meta,
        "dim": int(matrix.shape[0]),
        "hash": c_inv_hash(matrix),
        "condition_number": float(eigenvalues[-1] / eigenvalues[0]),
    }
    path.with_suffix(".json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return path
