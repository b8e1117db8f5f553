"""Concept files: one trained Perfusion concept as a small, self-contained ``.safetensors`` file.

Contents (docs/method.md, section 7 "The concept file"):
    value_outputs               o*_V of every edited value projection, one (out_features,) vector per
                                layer, concatenated in layer order; the header entry "value_layers"
                                lists [layer name, out_features] pairs.  (One tensor instead of one per
                                layer keeps the header small: an SD 1.5 concept is 63.9 kB, not 65.7 kB.)
    embedding                   the learned word embedding, (D_embed,)
    target_input                i*, (D,)
    c_inv_target_input          a = C^-1 i*, (D,)
    superclass_input            i_super, (D,): locked keys are rebuilt as o*_K = W_K i_super
plus metadata, each value JSON-encoded in the safetensors header so types round-trip.
Reading never executes pickle.

Two ablations (docs/method.md section 10) write format version 2; every other concept stays version 1, byte for
byte as before, and version-1 files load as before:
    key_outputs                 trained o*_K (``lock_keys: false``), concatenated like value_outputs; header entry
                                "key_layers"; metadata "lock_keys": false. Loading applies them instead of W_K i_super.
    embedding only              a Textual Inversion concept: "value_layers" is [], no value_outputs and none of
                                target_input / c_inv_target_input / superclass_input; it installs no edit.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from ldm.util import BadValueError, MissingFileError, atomic_write, diagnose_safetensors
from perfusion.covariance import check_positive_definite

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "REQUIRED_METADATA",
    "Concept",
    "save_concept",
    "load_concept",
    "concept_size_bytes",
    "check_concepts_compatible",
    "selected_gating",
    "choose_gating",
    "update_concept_metadata",
]

FORMAT_NAME = "perfusion-concept"
FORMAT_VERSION = 2  # the highest version this code reads; plain Perfusion concepts are still written as 1
VALUE_KEY = "value_outputs"
KEY_KEY = "key_outputs"
VECTOR_KEYS = ("embedding", "target_input", "c_inv_target_input", "superclass_input")
# Without these a concept cannot be matched to its base model / text encoder / C^-1 at inference.
REQUIRED_METADATA = ("base_model", "text_encoder", "placeholder", "superclass", "c_inv_hash")
# Written by save_concept itself (the header's "format"/"format_version" entries).
_RESERVED_METADATA = ("format", "format_version", "value_layers", "key_layers")


@dataclass
class Concept:
    """A loaded concept.  value_outputs keeps the file's layer order (as saved).

    An embedding-only (Textual Inversion) concept has empty value_outputs and None for the three vectors;
    key_outputs holds trained o*_K of a ``lock_keys: false`` concept, else None (keys locked to W_K i_super)."""

    value_outputs: "OrderedDict[str, torch.Tensor]"
    embedding: torch.Tensor
    target_input: Optional[torch.Tensor] = None
    c_inv_target_input: Optional[torch.Tensor] = None
    superclass_input: Optional[torch.Tensor] = None
    metadata: Dict[str, object] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    key_outputs: Optional["OrderedDict[str, torch.Tensor]"] = None

    @property
    def has_edit(self) -> bool:
        """False for an embedding-only concept: it changes no layer, only the placeholder's word embedding."""
        return bool(self.value_outputs)


def _as_vector(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 1:
        hint = (" (o*_V is ONE vector per layer; a (77, out) matrix is the per-position defect of a "
                "reference implementation)" if name.startswith("value output") else "")
        raise BadValueError(f"{name} must be a 1-D vector, got shape {tuple(tensor.shape)}{hint}")
    if not tensor.is_floating_point():
        raise BadValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    return tensor


def _layer_table(kind: str, outputs: Mapping[str, torch.Tensor]) -> list:
    return [[str(name), _as_vector(f"{kind} output of {name}", value).shape[0]] for name, value in outputs.items()]


def _write_concept_file(path, tensors: Mapping[str, torch.Tensor], header: dict, metadata: Mapping, caller: str):
    """The safetensors file of ``tensors`` with ``header`` plus ``metadata`` (JSON-encoded values), written
    atomically (a crash leaves the old file or the new one, never half of one)."""
    try:
        header.update({str(k): json.dumps(v) for k, v in metadata.items()})
    except TypeError as error:
        raise BadValueError(f"{caller}: metadata values must be JSON-serialisable: {error}") from None
    payload = safetensors_save(dict(tensors), metadata=header)
    atomic_write(path, lambda temporary: temporary.write_bytes(payload))
    return path


def save_concept(path, *, value_outputs: Mapping[str, torch.Tensor], embedding: torch.Tensor,
                 target_input: Optional[torch.Tensor] = None, c_inv_target_input: Optional[torch.Tensor] = None,
                 superclass_input: Optional[torch.Tensor] = None, metadata: Mapping[str, object],
                 dtype: torch.dtype = torch.float32,
                 key_outputs: Optional[Mapping[str, torch.Tensor]] = None) -> str:
    """Write a concept file atomically (ldm.util.atomic_write: temp file in the same folder, then os.replace).

    value_outputs: {layer name: (out_features,)}, in layer order.  metadata: JSON-serialisable values,
    must contain REQUIRED_METADATA (suggested: beta, tau, training_steps).  Returns the path.
    key_outputs: trained o*_K, {key layer name: (out_features,)} (``lock_keys: false``; metadata gets
    "lock_keys": false).  An embedding-only concept (Textual Inversion) passes empty value_outputs and no
    target_input, c_inv_target_input, superclass_input or key_outputs.
    """
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise BadValueError(f"concept file {path!r}: use the .safetensors extension")
    vectors = dict(embedding=embedding, target_input=target_input,
                   c_inv_target_input=c_inv_target_input, superclass_input=superclass_input)
    embedding_only = not value_outputs and not key_outputs and all(vectors[k] is None for k in VECTOR_KEYS[1:])
    if not value_outputs and not embedding_only:
        raise BadValueError("save_concept: value_outputs is empty; pass o*_V of every edited value layer (or only "
                            "the embedding, for an embedding-only concept)")
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise BadValueError(f"save_concept: metadata lacks {missing} (required: {list(REQUIRED_METADATA)})")
    reserved = [k for k in _RESERVED_METADATA if k in metadata]
    if reserved:
        raise BadValueError(f"save_concept: metadata keys {reserved} are written by save_concept itself")
    if key_outputs and metadata.get("lock_keys", False) is not False:
        raise BadValueError("save_concept: key_outputs are trained keys; metadata 'lock_keys' must be false")

    tensors: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    layers = _layer_table("value", value_outputs or {})
    if embedding_only:
        tensors["embedding"] = _as_vector("embedding", embedding)
    else:
        tensors[VALUE_KEY] = torch.cat([value.detach().reshape(-1).to(device="cpu", dtype=dtype)
                                        for value in value_outputs.values()])
        for key in VECTOR_KEYS:
            if vectors[key] is None:
                raise BadValueError(f"save_concept: {key} is missing (a concept with value outputs needs all of "
                                    f"{list(VECTOR_KEYS)})")
            tensors[key] = _as_vector(key, vectors[key])
        dims = {key: tensors[key].shape[0] for key in VECTOR_KEYS[1:]}
        if len(set(dims.values())) != 1:
            raise BadValueError(f"save_concept: target_input, c_inv_target_input and superclass_input must have "
                             f"the same dimension, got {dims}")
    if key_outputs:
        key_layers = _layer_table("key", key_outputs)
        tensors[KEY_KEY] = torch.cat([key.detach().reshape(-1).to(device="cpu", dtype=dtype)
                                      for key in key_outputs.values()])
        metadata = {**metadata, "lock_keys": False}
    tensors = OrderedDict((k, v.detach().to(device="cpu", dtype=dtype).contiguous()) for k, v in tensors.items())

    version = 2 if (embedding_only or key_outputs) else 1  # version-1 files are unchanged, byte for byte
    header = {"format": FORMAT_NAME, "format_version": str(version),
              "value_layers": json.dumps(layers, separators=(",", ":"))}
    if key_outputs:
        header["key_layers"] = json.dumps(key_layers, separators=(",", ":"))
    return _write_concept_file(path, tensors, header, metadata, "save_concept")


def _describe_non_safetensors(path: str) -> str:
    with open(path, "rb") as handle:
        magic = handle.read(8)
    if magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80":
        return (f"{path} is a pickled PyTorch checkpoint (.ckpt/.pt), e.g. the reference implementation's "
                f"old concept format; it cannot be read without executing pickle, which this project refuses "
                f"for untrusted files. Use a .safetensors concept file written by this project.")
    return diagnose_safetensors(path)


def load_concept(path, device="cpu") -> Concept:
    """Read a concept file written by save_concept; tensors keep their stored dtype."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"concept file not found: {path}")
    try:
        with safe_open(path, framework="pt", device=str(device)) as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError):
        raise BadValueError(_describe_non_safetensors(path)) from None
    if header.get("format") != FORMAT_NAME:
        raise BadValueError(f"{path} is a safetensors file but not a Perfusion concept (header 'format' is "
                         f"{header.get('format')!r}, expected {FORMAT_NAME!r})")
    version = int(header.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise BadValueError(f"{path} has concept format version {version}; this code reads up to "
                         f"{FORMAT_VERSION}. Update the project.")

    # An embedding-only concept (version 2) lists no value layers and holds no value outputs.
    embedding_only = version >= 2 and header.get("value_layers") == "[]" and VALUE_KEY not in tensors
    required = ("embedding",) if embedding_only else (VALUE_KEY,) + VECTOR_KEYS
    missing = [k for k in required if k not in tensors]
    if "value_layers" not in header:
        missing.append("header entry 'value_layers'")
    if KEY_KEY in tensors and "key_layers" not in header:
        missing.append("header entry 'key_layers'")
    if missing:
        raise BadValueError(f"{path} lacks {missing}; the file is incomplete or not a concept file")

    def split_layers(entry: str, key: str) -> "OrderedDict[str, torch.Tensor]":
        try:
            layers = [(str(name), int(width)) for name, width in json.loads(header[entry])]
        except (ValueError, TypeError) as error:
            raise BadValueError(f"{path}: header entry '{entry}' is malformed ({error}); the file is corrupt") from None
        flat = _as_vector(key, tensors[key])
        widths = [width for _, width in layers]
        if sum(widths) != flat.shape[0]:
            raise BadValueError(f"{path}: '{entry}' lists widths summing to {sum(widths)} but the "
                             f"{key} tensor has {flat.shape[0]} values; the file is corrupt")
        return OrderedDict((name, part) for (name, _), part in zip(layers, flat.split(widths)))

    value_outputs = OrderedDict() if embedding_only else split_layers("value_layers", VALUE_KEY)
    key_outputs = split_layers("key_layers", KEY_KEY) if KEY_KEY in tensors else None
    vectors = {key: _as_vector(key, tensors[key]) for key in required if key != VALUE_KEY}
    if not embedding_only:
        dims = {key: vectors[key].shape[0] for key in VECTOR_KEYS[1:]}
        if len(set(dims.values())) != 1:
            raise BadValueError(f"{path}: target_input, c_inv_target_input and superclass_input have different "
                             f"dimensions {dims}; the file is corrupt")

    metadata = {}
    for key, text in header.items():
        if key in _RESERVED_METADATA:
            continue
        try:
            metadata[key] = json.loads(text)
        except json.JSONDecodeError:
            metadata[key] = text          # a plain string written by another tool
    return Concept(value_outputs=value_outputs, metadata=metadata, format_version=version, key_outputs=key_outputs,
                   **vectors)


def concept_size_bytes(value_widths: Iterable[int], dim: int, bytes_per_float: int = 4) -> int:
    """Tensor payload of one concept: sum(value widths) + 4 vectors of ``dim`` (header not counted).

    Assumes the embedding has the text-encoder dimension ``dim`` (true for SD 1.x and 2.x).
    """
    return (sum(value_widths) + len(VECTOR_KEYS) * dim) * bytes_per_float


def check_concepts_compatible(concepts: List[Concept], names: List[str] = None) -> None:
    """Concepts combined at inference must share base model, text encoder, C^-1 and layer set (C^-1 and layers:
    among the concepts that edit layers; an embedding-only concept has neither)."""
    if not concepts:
        return
    names = names or [f"concept {i + 1}" for i in range(len(concepts))]
    for name, concept in zip(names[1:], concepts[1:]):
        for key in ("base_model", "text_encoder"):
            if concept.metadata.get(key) != concepts[0].metadata.get(key):
                raise BadValueError(f"{name} has {key}={concept.metadata.get(key)!r} but {names[0]} has "
                                 f"{concepts[0].metadata.get(key)!r}; multi-concept inference needs concepts "
                                 f"trained on the same base model with the same C^-1")
    edited = [(n, c) for n, c in zip(names, concepts) if c.has_edit]
    if not edited:
        return
    names, concepts = [n for n, _ in edited], [c for _, c in edited]
    first = concepts[0]
    for name, concept in zip(names[1:], concepts[1:]):
        for key in ("c_inv_hash",):
            if concept.metadata.get(key) != first.metadata.get(key):
                raise BadValueError(f"{name} has {key}={concept.metadata.get(key)!r} but {names[0]} has "
                                 f"{first.metadata.get(key)!r}; multi-concept inference needs concepts "
                                 f"trained on the same base model with the same C^-1")
        if list(concept.value_outputs) != list(first.value_outputs):
            raise BadValueError(f"{name} edits different value layers than {names[0]}")
        if concept.target_input.shape != first.target_input.shape:
            raise BadValueError(f"{name} has text dimension {concept.target_input.shape[0]}, "
                             f"{names[0]} has {first.target_input.shape[0]}")


def check_target_inputs_independent(concepts: List[Concept], names: List[str] = None,
                                    max_condition: float = 1e6) -> None:
    """K concepts are edited jointly through G = A^T I (K x K); it must be well conditioned.

    The same concept given twice (or two concepts with the same i*) makes G singular.
    """
    names = names or [f"concept {i + 1}" for i in range(len(concepts))]
    edited = [(n, c) for n, c in zip(names, concepts) if c.has_edit]  # embedding-only concepts have no i*
    names, concepts = [n for n, _ in edited], [c for _, c in edited]
    if len(concepts) < 2:
        return
    targets = torch.stack([c.target_input.double() for c in concepts])
    c_inv_targets = torch.stack([c.c_inv_target_input.double() for c in concepts])
    gram = c_inv_targets @ targets.T
    try:
        check_positive_definite(gram, "G = A^T I", rcond=1.0 / max_condition)
    except BadValueError as error:
        normalized = targets / targets.norm(dim=1, keepdim=True)
        cosine = normalized @ normalized.T
        cosine.fill_diagonal_(-1)
        j, k = divmod(int(cosine.argmax()), len(concepts))
        raise BadValueError(f"{names[j]} and {names[k]} have nearly the same target input i* (cosine "
                         f"{float(cosine[j, k]):.6f}): the concepts cannot be told apart. Is the same concept "
                         f"file given twice? ({error})") from None


# ----- a concept's own default beta/tau ---------------------------------------------------------------------------
# Every concept file stores "beta"/"tau" (the generic inference defaults at save time, for information). A value
# *selected for this concept* (scripts/evaluate.py --select-beta) is marked by a "selected_by" record beside them
# (rule, locking mode, scores); only then do perfusion_txt2img.py and friends use the file's beta/tau as defaults.
SELECTED_BY_KEY = "selected_by"


def selected_gating(concept: Concept, global_locking: bool = False):
    """(beta, tau) selected for this concept with the given locking mode, or None: no selection was stored, or it
    was made with the other locking mode (global locking wants a lower beta than local locking)."""
    record = concept.metadata.get(SELECTED_BY_KEY)
    if not isinstance(record, dict) or "beta" not in concept.metadata or "tau" not in concept.metadata:
        return None
    if bool(record.get("global_locking", False)) != bool(global_locking):
        return None
    return float(concept.metadata["beta"]), float(concept.metadata["tau"])


def choose_gating(concepts: List[Concept], beta=None, tau=None, global_locking: bool = False,
                  names: List[str] = None):
    """(betas, taus, beta_sources, tau_sources), one entry per concept (one entry without concepts): the gate every
    front end (perfusion_txt2img.py, perfusion.diffusers.apply_concepts) uses.

    ``beta``/``tau``: None, one number, or one per concept. A given value wins ("flag"); without it a concept whose
    file holds a beta/tau selected for it with the same locking mode (``selected_gating``) uses that ("concept
    file"); otherwise the generic default of ``inference_gating(number of concepts)`` ("default")."""
    from perfusion.roe import inference_gating

    k = len(concepts)
    default_beta, default_tau = inference_gating(k)
    selected = [selected_gating(c, global_locking) for c in concepts]
    for i, concept in enumerate(concepts):
        if (beta is None or tau is None) and selected[i] is None and selected_gating(concept, not global_locking):
            name = names[i] if names else f"concept {i + 1}"
            mode = "without" if global_locking else "with"
            warnings.warn(f"{name} holds a beta/tau selected {mode} global locking, which this run does not match; "
                          "the generic defaults apply")
    results = []
    for given, what, default, index in ((beta, "beta", default_beta, 0), (tau, "tau", default_tau, 1)):
        if given is None:
            values = [s[index] if s else default for s in selected] if concepts else [default]
            results.append((values, ["concept file" if s else "default" for s in selected] if concepts else ["default"]))
            continue
        values = [float(v) for v in (given if isinstance(given, (list, tuple)) else [given])]
        if len(values) == 1:
            values = values * max(k, 1)
        elif len(values) != k:
            raise BadValueError(f"{what} has {len(values)} values but {k} concept(s) were given; give one value or "
                                "one per concept")
        results.append((values, ["flag"] * len(values)))
    (betas, beta_sources), (taus, tau_sources) = results
    return betas, taus, beta_sources, tau_sources


def update_concept_metadata(path, updates: Mapping[str, object]) -> str:
    """Rewrite a concept file with the same tensors (bytes unchanged) and its metadata updated by ``updates``
    (JSON-serialisable values), atomically (ldm.util.atomic_write). Returns the path."""
    path = os.fspath(path)
    load_concept(path)  # refuses anything that is not a readable concept file
    reserved = [k for k in _RESERVED_METADATA if k in updates]
    if reserved:
        raise BadValueError(f"update_concept_metadata: keys {reserved} are written by save_concept itself")
    with safe_open(path, framework="pt", device="cpu") as handle:
        header = dict(handle.metadata() or {})
        tensors = OrderedDict((key, handle.get_tensor(key)) for key in handle.keys())
    return _write_concept_file(path, tensors, header, updates, "update_concept_metadata")
