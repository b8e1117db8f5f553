"""C^-1, the inverse uncentered covariance of text-encoder token encodings: estimating, checking, reading, writing.

C = (1/N) sum e e^T over the real tokens (start token through EOS) of a caption corpus; make one with
``python data/estimate_C_inv.py`` (a command line over ``accumulate_second_moment`` and ``invert_covariance``).
A concept trained with one C^-1 must be used with the same one, so every file carries a short content hash
(``c_inv_hash``) that concept files can record and compare.

Real token positions only: the padding after EOS is not text. In a 77-token sequence it is most of the
positions, and its encodings (EOS / zero-token embeddings passed through causal attention) are nearly identical
to each other, so including them would make C describe padding rather than language. The sums are accumulated
in float64.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from ldm.modules.encoders.modules import first_eos_positions
from ldm.util import BadValueError, MissingFileError

HOW_TO_MAKE = (
    "Make one with: python data/estimate_C_inv.py --caption captions.txt --type clip "
    "--ckpt ckpt/v1-5-pruned-emaonly.ckpt --save_path ckpt/C_inv_sd1.npy "
    "(--type openclip with an SD 2.x checkpoint for SD 2.x, --type sdxl with sd_xl_base_1.0.safetensors for SD XL)."
)
SYMMETRY_RTOL = 1e-5  # inverting in float32 leaves asymmetries around 1e-7 relative; anything larger is wrong
RCOND = 1e-12  # smallest eigenvalue of C accepted when estimating, relative to the largest


def check_positive_definite(matrix: torch.Tensor | np.ndarray, what: str, *, rcond: float = 0.0,
                            hint: str = "") -> torch.Tensor:
    """Eigenvalues (ascending, float64) of the symmetric part of ``matrix`` when it is positive definite.

    Raises BadValueError naming ``what`` (followed by ``hint``) when the matrix holds NaN/inf, its Cholesky
    factorisation fails, or its smallest eigenvalue is <= ``rcond`` x the largest (rcond > 0 also refuses a
    matrix so close to singular that its inverse would be dominated by rounding).
    """
    matrix = torch.as_tensor(matrix).detach().double()
    suffix = f" {hint}" if hint else ""
    if not torch.isfinite(matrix).all():
        raise BadValueError(f"{what} contains NaN or infinite values.{suffix}")
    matrix = 0.5 * (matrix + matrix.T)
    eigenvalues = torch.linalg.eigvalsh(matrix)
    if torch.linalg.cholesky_ex(matrix).info.item() != 0 or eigenvalues[0] <= rcond * eigenvalues[-1]:
        singular = "singular / " if rcond > 0 else ""
        raise BadValueError(f"{what} is {singular}not positive definite (eigenvalues {eigenvalues[0].item():.3g} .. "
                            f"{eigenvalues[-1].item():.3g}).{suffix}")
    return eigenvalues


def real_token_mask(tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Bool (B, L): True from the start token through the first EOS of each row, inclusive (the whole row where a
    caption was cut before its EOS). Only the *first* EOS counts: SD 1.x pads with EOS itself."""
    position = torch.arange(tokens.shape[1], device=tokens.device)[None]
    return position <= first_eos_positions(tokens, eos_token_id)[:, None]


@torch.no_grad()
def accumulate_second_moment(encoder, captions: list[str], batch_size: int = 64, device: str = "cpu",
                             progress: Callable[[Iterable], Iterable] | None = None):
    """Return (S, N): S = sum of e e^T (float64, D x D) over the N real-token encodings of ``captions``.

    ``encoder`` has ``width``, ``eos_token_id``, ``tokenize`` and ``encode_tokens`` (the frozen text encoders of
    ldm.modules.encoders.modules). ``progress`` wraps the iterable of batch starts (e.g. tqdm) when given.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    second_moment = torch.zeros(encoder.width, encoder.width, dtype=torch.float64, device=device)
    n_tokens = 0
    batches = range(0, len(captions), batch_size)
    for start in progress(batches) if progress is not None else batches:
        tokens = encoder.tokenize(captions[start : start + batch_size]).to(device)
        encodings = encoder.encode_tokens(tokens)
        real = encodings[real_token_mask(tokens, encoder.eos_token_id)].double()  # (n, D)
        second_moment += real.T @ real
        n_tokens += real.shape[0]
    return second_moment, n_tokens


def invert_covariance(second_moment: torch.Tensor, n_tokens: int, eps: float = 0.0):
    """Return (C^-1, condition number of C) for C = S / N + eps I; refuse a C that is not positive definite.

    Below RCOND the inverse is dominated by rounding (float64 has ~16 digits): such a C counts as singular.
    """
    dim = second_moment.shape[0]
    cov = second_moment / n_tokens + eps * torch.eye(dim, dtype=second_moment.dtype, device=second_moment.device)
    cov = 0.5 * (cov + cov.T)
    eigenvalues = check_positive_definite(
        cov, f"C (N = {n_tokens} token vectors for dimension {dim})", rcond=RCOND,
        hint=f"Use more captions (N should be far above {dim}) or add a ridge eps "
             "(data/estimate_C_inv.py --eps, e.g. --eps 1e-6).")
    c_inv = torch.cholesky_inverse(torch.linalg.cholesky(cov))
    return 0.5 * (c_inv + c_inv.T), (eigenvalues[-1] / eigenvalues[0]).item()


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
            "(768 for SD 1.x CLIP, 1024 for SD 2.x OpenCLIP, 2048 for SD XL's two encoders). Use the file made for "
            "this text encoder."
        )
    if not np.isfinite(matrix).all():
        raise BadValueError(f"{path}: C^-1 contains NaN or infinite values. {HOW_TO_MAKE}")
    scale = np.abs(matrix).max()
    asym = np.abs(matrix - matrix.T).max()
    if asym > SYMMETRY_RTOL * scale:
        raise BadValueError(f"{path}: C^-1 is not symmetric (max |A - A^T| = {asym:.3g}, max |A| = {scale:.3g})")
    c_inv = torch.from_numpy(0.5 * (matrix + matrix.T))
    check_positive_definite(c_inv, f"{path}: C^-1", hint=HOW_TO_MAKE)
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
    eigenvalues = check_positive_definite(matrix, f"refusing to save {path}: C^-1").numpy()
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
