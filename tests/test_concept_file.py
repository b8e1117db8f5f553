"""Concept files (perfusion/concept_file.py): size, exact round trip, clear errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from perfusion.concept_file import (
    REQUIRED_METADATA,
    Concept,
    check_concepts_compatible,
    check_target_inputs_independent,
    concept_size_bytes,
    load_concept,
    save_concept,
)

# SD 1.5: 16 cross-attention value projections, in UNet module order.
SD15_VALUE_LAYERS = [
    ("input_blocks.1.1", 320), ("input_blocks.2.1", 320), ("input_blocks.4.1", 640),
    ("input_blocks.5.1", 640), ("input_blocks.7.1", 1280), ("input_blocks.8.1", 1280),
    ("middle_block.1", 1280), ("output_blocks.3.1", 1280), ("output_blocks.4.1", 1280),
    ("output_blocks.5.1", 1280), ("output_blocks.6.1", 640), ("output_blocks.7.1", 640),
    ("output_blocks.8.1", 640), ("output_blocks.9.1", 320), ("output_blocks.10.1", 320),
    ("output_blocks.11.1", 320),
]
SD15_DIM = 768


def sd15_concept_tensors(seed=0, dim=SD15_DIM):
    gen = torch.Generator().manual_seed(seed)
    value_outputs = {f"{block}.transformer_blocks.0.attn2.to_v": torch.randn(width, generator=gen)
                     for block, width in SD15_VALUE_LAYERS}
    vectors = {key: torch.randn(dim, generator=gen)
               for key in ("embedding", "target_input", "c_inv_target_input", "superclass_input")}
    return value_outputs, vectors


def sd15_metadata(**overrides):
    metadata = {
        "base_model": "sd1",
        "text_encoder": "openai/clip-vit-large-patch14",
        "placeholder": "*",
        "superclass": "teddy",
        "c_inv_hash": "sha256:" + "ab" * 32,
        "beta": 0.7,
        "tau": 0.15,
        "training_steps": 400,
    }
    metadata.update(overrides)
    return metadata


def write_sd15(path, seed=0, **metadata_overrides):
    value_outputs, vectors = sd15_concept_tensors(seed)
    save_concept(path, value_outputs=value_outputs, metadata=sd15_metadata(**metadata_overrides), **vectors)
    return value_outputs, vectors


def test_sd15_concept_file_is_under_64_kb(tmp_path):
    widths = [width for _, width in SD15_VALUE_LAYERS]
    assert widths == [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]
    assert sum(widths) == 12_480
    assert concept_size_bytes(widths, SD15_DIM) == 15_552 * 4 == 62_208
    path = tmp_path / "teddy.safetensors"
    write_sd15(path)
    size = os.path.getsize(path)
    print(f"SD 1.5 concept file: {size} bytes (tensor payload 62,208)")
    assert 62_208 < size <= 64_000


def test_round_trip_is_bit_identical_and_keeps_metadata_and_layer_order(tmp_path):
    path = tmp_path / "teddy.safetensors"
    value_outputs, vectors = write_sd15(path, seed=1)
    concept = load_concept(path)
    assert isinstance(concept, Concept)
    assert list(concept.value_outputs) == list(value_outputs)          # module order, not alphabetical
    for name, tensor in value_outputs.items():
        loaded = concept.value_outputs[name]
        assert loaded.dtype == torch.float32 and loaded.shape == tensor.shape
        assert torch.equal(loaded, tensor), name
    for key, tensor in vectors.items():
        assert torch.equal(getattr(concept, key), tensor), key
    assert concept.metadata == sd15_metadata()
    assert type(concept.metadata["training_steps"]) is int and type(concept.metadata["beta"]) is float
    assert concept.format_version == 1


def test_half_precision_option_and_no_leftover_temp_files(tmp_path):
    value_outputs, vectors = sd15_concept_tensors(2)
    path = tmp_path / "sub" / "teddy16.safetensors"
    save_concept(path, value_outputs=value_outputs, metadata=sd15_metadata(), dtype=torch.float16, **vectors)
    concept = load_concept(path)
    assert concept.embedding.dtype == torch.float16
    assert torch.equal(concept.embedding, vectors["embedding"].half())
    assert os.path.getsize(path) < 33_000
    assert os.listdir(tmp_path / "sub") == ["teddy16.safetensors"]


def test_overwrite_is_atomic_failure_keeps_old_file(tmp_path):
    path = tmp_path / "teddy.safetensors"
    write_sd15(path, seed=3)
    before = path.read_bytes()
    value_outputs, vectors = sd15_concept_tensors(4)
    with pytest.raises(ValueError, match="JSON"):
        save_concept(path, value_outputs=value_outputs, metadata=sd15_metadata(bad=object()), **vectors)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["teddy.safetensors"]
    write_sd15(path, seed=4)
    assert torch.equal(load_concept(path).embedding, vectors["embedding"])


def test_reference_ckpt_is_refused_without_unpickling(tmp_path):
    old = tmp_path / "teddy.ckpt"
    torch.save({"state_dict": {"embedding": torch.zeros(768)}}, old)
    with pytest.raises(ValueError, match="pickle"):
        load_concept(old)
    garbage = tmp_path / "notes.safetensors"
    garbage.write_bytes(b"definitely not tensors")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_concept(garbage)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_concept(tmp_path / "missing.safetensors")


def test_missing_keys_wrong_shapes_and_foreign_files_are_clear_errors(tmp_path):
    value_outputs, vectors = sd15_concept_tensors(5, dim=32)
    with pytest.raises(ValueError, match=r"1-D vector.*\(77, out\)"):
        bad = dict(value_outputs)
        bad[next(iter(bad))] = torch.zeros(77, 320)
        save_concept(tmp_path / "a.safetensors", value_outputs=bad, metadata=sd15_metadata(), **vectors)
    with pytest.raises(ValueError, match="same dimension"):
        save_concept(tmp_path / "a.safetensors", value_outputs=value_outputs, metadata=sd15_metadata(),
                     **{**vectors, "superclass_input": torch.zeros(31)})
    with pytest.raises(ValueError, match="c_inv_hash"):
        metadata = sd15_metadata()
        del metadata["c_inv_hash"]
        save_concept(tmp_path / "a.safetensors", value_outputs=value_outputs, metadata=metadata, **vectors)
    with pytest.raises(ValueError, match=".safetensors extension"):
        save_concept(tmp_path / "a.pt", value_outputs=value_outputs, metadata=sd15_metadata(), **vectors)
    assert set(REQUIRED_METADATA) <= set(sd15_metadata())

    # A safetensors file from elsewhere (e.g. an SD checkpoint) is named as such.
    foreign = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="not a Perfusion concept"):
        load_concept(foreign)

    # A concept file that lost a tensor, or whose layer table disagrees with the data.
    good = tmp_path / "good.safetensors"
    save_concept(good, value_outputs=value_outputs, metadata=sd15_metadata(), **vectors)
    concept = load_concept(good)
    assert concept.target_input.shape == (32,)
    header = {"format": "perfusion-concept", "format_version": "1",
              "value_layers": json.dumps([[name, t.shape[0]] for name, t in value_outputs.items()])}
    flat = torch.cat(list(value_outputs.values()))
    partial = tmp_path / "partial.safetensors"
    save_file({"value_outputs": flat, **{k: v for k, v in vectors.items() if k != "c_inv_target_input"}},
              partial, metadata=header)
    with pytest.raises(ValueError, match="c_inv_target_input"):
        load_concept(partial)
    short = tmp_path / "short.safetensors"
    save_file({"value_outputs": flat[:-1], **vectors}, short, metadata=header)
    with pytest.raises(ValueError, match="widths summing to 12480"):
        load_concept(short)


def test_header_is_plain_json_readable_by_any_tool(tmp_path):
    """The stored header is plain JSON: metadata readable by any safetensors tool."""
    path = tmp_path / "teddy.safetensors"
    write_sd15(path)
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    assert header["__metadata__"]["superclass"] == '"teddy"'
    assert header["value_outputs"]["shape"] == [12_480]
    assert header["embedding"]["shape"] == [SD15_DIM]


def test_concepts_from_different_c_inv_cannot_be_combined(tmp_path):
    write_sd15(tmp_path / "a.safetensors", seed=6)
    write_sd15(tmp_path / "b.safetensors", seed=7, placeholder="&", superclass="cat")
    write_sd15(tmp_path / "c.safetensors", seed=8, c_inv_hash="sha256:" + "cd" * 32)
    a, b, c = (load_concept(tmp_path / f"{n}.safetensors") for n in "abc")
    check_concepts_compatible([a, b])
    with pytest.raises(ValueError, match="c_inv_hash"):
        check_concepts_compatible([a, c], ["teddy", "other"])


def test_same_concept_twice_is_refused(tmp_path):
    write_sd15(tmp_path / "a.safetensors", seed=6)
    write_sd15(tmp_path / "b.safetensors", seed=7)
    a, b = (load_concept(tmp_path / f"{n}.safetensors") for n in "ab")
    # a_k = i*_k: G = A^T I is the (positive definite) Gram matrix of two random vectors
    a.c_inv_target_input, b.c_inv_target_input = a.target_input, b.target_input
    check_target_inputs_independent([a, b])
    with pytest.raises(ValueError, match=r"^teddy and again have nearly the same target input i\* \(cosine 1\.0+\).*"
                                         r"given twice\? \(G = A\^T I is singular / not positive definite"):
        check_target_inputs_independent([a, a], ["teddy", "again"])


def test_trained_keys_and_embedding_only_concepts_are_version_2_and_round_trip(tmp_path):
    """The ablations of docs/method.md section 10: trained keys (lock_keys: false) and an embedding-only (Textual
    Inversion) concept. Plain concepts stay version 1 with the same header entries as before."""
    plain = tmp_path / "plain.safetensors"
    value_outputs, vectors = write_sd15(plain, seed=9)
    raw = plain.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    assert header["__metadata__"]["format_version"] == "1" and "key_layers" not in header["__metadata__"]
    assert set(header) - {"__metadata__"} == {"value_outputs", "embedding", "target_input", "c_inv_target_input",
                                               "superclass_input"}
    concept = load_concept(plain)
    assert concept.format_version == 1 and concept.key_outputs is None and concept.has_edit

    gen = torch.Generator().manual_seed(10)
    keys = {name.replace("to_v", "to_k"): torch.randn(v.shape[0], generator=gen) for name, v in value_outputs.items()}
    trained = tmp_path / "keys.safetensors"
    save_concept(trained, value_outputs=value_outputs, key_outputs=keys, metadata=sd15_metadata(), **vectors)
    concept = load_concept(trained)
    assert concept.format_version == 2 and concept.metadata["lock_keys"] is False
    assert list(concept.key_outputs) == list(keys) and all(torch.equal(concept.key_outputs[k], v) for k, v in keys.items())
    assert os.path.getsize(trained) - os.path.getsize(plain) < 12_480 * 4 + 2048  # o*_K as large as o*_V
    with pytest.raises(ValueError, match="lock_keys"):
        save_concept(trained, value_outputs=value_outputs, key_outputs=keys, metadata=sd15_metadata(lock_keys=True),
                     **vectors)

    embedding_only = tmp_path / "ti.safetensors"
    save_concept(embedding_only, value_outputs={}, embedding=vectors["embedding"],
                 metadata=sd15_metadata(c_inv_hash=None, method="textual_inversion"))
    ti = load_concept(embedding_only)
    assert ti.format_version == 2 and not ti.has_edit and not ti.value_outputs
    assert torch.equal(ti.embedding, vectors["embedding"])
    assert ti.target_input is None and ti.c_inv_target_input is None and ti.superclass_input is None
    assert os.path.getsize(embedding_only) < SD15_DIM * 4 + 1024
    with pytest.raises(ValueError, match="value_outputs is empty"):
        save_concept(tmp_path / "bad.safetensors", value_outputs={}, metadata=sd15_metadata(), **vectors)
    # it combines with edited concepts of any C^-1; the edited ones are still checked among themselves
    check_concepts_compatible([ti, concept, load_concept(plain)])
    check_target_inputs_independent([ti, load_concept(plain)])
    with pytest.raises(ValueError, match="c_inv_hash"):
        write_sd15(tmp_path / "other.safetensors", seed=11, c_inv_hash="sha256:" + "cd" * 32)
        check_concepts_compatible([ti, concept, load_concept(tmp_path / "other.safetensors")])
