"""C^-1 estimation (perfusion/covariance.py and its command line data/estimate_C_inv.py) and C^-1 file I/O."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.util import save_state_dict
from perfusion.covariance import (
    accumulate_second_moment,
    c_inv_hash,
    check_positive_definite,
    invert_covariance,
    load_c_inv,
    real_token_mask,
    save_c_inv,
)
from tests._tiny_text_encoders import TINY_CLIP_TEXT_CONFIG, TINY_OPENCLIP_MODEL_CFG, tiny_clip, tiny_openclip

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "data" / "estimate_C_inv.py"

_spec = importlib.util.spec_from_file_location("estimate_C_inv", SCRIPT)
estimate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(estimate)

CAPTIONS = [
    "a photo of a dog on the beach",
    "two cats sleeping on a red sofa",
    "An aerial view of a city at night, lights everywhere.",
    "a bowl of fruit: apples, bananas and oranges",
    "portrait of an old man with a grey beard",
    "a red car parked next to a tall building",
    "children playing football in a park",
    "a snowy mountain under a clear blue sky",
    "a cup of coffee and a croissant on a wooden table",
    "a teddy bear sitting on a bed",
    "the Eiffel tower at sunset",
    "a bicycle leaning against a brick wall",
    "close-up of a sunflower with a bee",
    "a man riding a horse across a river",
    "an empty street after the rain",
    "a plate of spaghetti with tomato sauce",
    "a small boat on a calm lake at dawn",
    "a woman reading a book in a library",
    "a white kitten playing with yarn",
    "a lighthouse on a rocky coast during a storm",
]


def _numpy_c_inv(encoder, captions, batch_size):
    """Direct computation: encode, keep positions [0, first EOS] of each row, C = X^T X / N, invert."""
    rows = []
    with torch.no_grad():
        for start in range(0, len(captions), batch_size):
            tokens = encoder.tokenize(captions[start : start + batch_size]).numpy()
            encodings = encoder.encode(captions[start : start + batch_size]).double().numpy()
            for tok, enc in zip(tokens, encodings):
                first_eos = int(np.argmax(tok == encoder.eos_token_id))
                rows.append(enc[: first_eos + 1])
    x = np.concatenate(rows)
    return np.linalg.inv(x.T @ x / len(x)), len(x)


def test_real_token_mask_stops_at_first_eos():
    tokens = torch.tensor([[49406, 320, 1929, 49407, 49407, 49407], [49406, 320, 49407, 0, 0, 0]])
    mask = real_token_mask(tokens, 49407)
    assert mask.tolist() == [[True, True, True, True, False, False], [True, True, True, False, False, False]]


@pytest.mark.parametrize("make", [tiny_clip, tiny_openclip], ids=["clip", "openclip"])
def test_estimate_equals_numpy_on_real_tokens(make, tmp_path):
    encoder = make(seed=0)
    second_moment, n_tokens = accumulate_second_moment(encoder, CAPTIONS, batch_size=8)
    c_inv, condition = invert_covariance(second_moment, n_tokens)
    reference, n_reference = _numpy_c_inv(encoder, CAPTIONS, batch_size=8)
    assert n_tokens == n_reference
    assert 20 * 5 < n_tokens < 20 * 20  # real tokens only: far fewer than 20 x 77 padded positions
    assert np.linalg.norm(c_inv.numpy() - reference) <= 1e-8 * np.linalg.norm(reference)
    assert torch.equal(c_inv, c_inv.T) and torch.linalg.eigvalsh(c_inv)[0] > 0
    assert condition > 1

    path = save_c_inv(tmp_path / "c_inv.npy", c_inv, {"encoder": "tiny", "n_tokens": n_tokens, "eps": 0.0})
    reloaded = load_c_inv(path, expected_dim=encoder.width)
    assert reloaded.dtype == torch.float64 and torch.equal(reloaded, c_inv)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["hash"] == c_inv_hash(reloaded) and len(meta["hash"]) == 16
    assert meta["n_tokens"] == n_tokens and meta["dim"] == encoder.width
    assert meta["condition_number"] == pytest.approx(condition, rel=1e-6)


def test_padding_would_change_the_estimate():
    """Guards the real-token choice: including padding gives a measurably different C."""
    encoder = tiny_clip(seed=0)
    with torch.no_grad():
        all_positions = encoder.encode(CAPTIONS).reshape(-1, encoder.width).double()
    padded_cov = all_positions.T @ all_positions / all_positions.shape[0]
    second_moment, n_tokens = accumulate_second_moment(encoder, CAPTIONS, batch_size=8)
    real_cov = second_moment / n_tokens
    assert (padded_cov - real_cov).norm() > 0.1 * real_cov.norm()


def test_singular_covariance_is_refused_and_eps_fixes_it():
    encoder = tiny_clip(seed=0)
    second_moment, n_tokens = accumulate_second_moment(encoder, CAPTIONS[:1], batch_size=4)
    assert n_tokens < encoder.width  # rank-deficient
    with pytest.raises(ValueError, match=r"C \(N = \d+ token vectors for dimension 32\) is singular / not positive "
                                         r"definite \(eigenvalues .*\)\. Use more captions.*--eps"):
        invert_covariance(second_moment, n_tokens)
    c_inv, _ = invert_covariance(second_moment, n_tokens, eps=1e-3)
    cov = second_moment / n_tokens + 1e-3 * torch.eye(encoder.width, dtype=torch.float64)
    torch.testing.assert_close(c_inv @ cov, torch.eye(encoder.width, dtype=torch.float64), atol=1e-8, rtol=0)


def test_script_runs_as_subprocess_with_sd_checkpoint(tmp_path):
    encoder = tiny_clip(seed=11)
    ckpt = tmp_path / "tiny_sd.ckpt"
    sd_state = {"cond_stage_model." + k: v for k, v in encoder.state_dict().items()}
    sd_state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd_state["model.diffusion_model.dummy.weight"] = torch.zeros(2)
    save_state_dict(sd_state, ckpt)
    (tmp_path / "encoder.yaml").write_text(json.dumps({
        "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
        "params": {"text_config": TINY_CLIP_TEXT_CONFIG},
    }))
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS + ["", "   ", "never used: beyond --n_captions"]) + "\n")
    out = tmp_path / "out" / "C_inv.npy"
    # --seed differs from the encoder's: the weights must come from --ckpt for the numbers to agree
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--caption", str(captions), "--encoder_config", str(tmp_path / "encoder.yaml"),
         "--ckpt", str(ckpt), "--save_path", str(out), "--batch_size", "8", "--n_captions", "20",
         "--device", "cpu", "--seed", "123"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    reference, n_reference = _numpy_c_inv(encoder, CAPTIONS, batch_size=8)
    assert f"N = {n_reference} token vectors" in result.stdout
    c_inv = load_c_inv(out)
    assert np.linalg.norm(c_inv.numpy() - reference) <= 1e-8 * np.linalg.norm(reference)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["n_tokens"] == n_reference and meta["n_captions"] == 20 and meta["eps"] == 0.0
    assert meta["hash"] == c_inv_hash(c_inv) and meta["encoder"].startswith("FrozenCLIPEmbedder(")


def test_script_errors_are_clear(tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("a dog\n")
    (tmp_path / "encoder.yaml").write_text(json.dumps({
        "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
        "params": {"model_cfg": TINY_OPENCLIP_MODEL_CFG},
    }))
    save_path = tmp_path / "c.npy"
    with pytest.raises(ValueError, match="--eps"):  # 4 token vectors for 32 dimensions
        estimate.main(["--caption", str(captions), "--encoder_config", str(tmp_path / "encoder.yaml"),
                       "--save_path", str(save_path), "--device", "cpu"])
    assert not save_path.exists()
    with pytest.raises(ValueError, match="--ckpt is required"):
        estimate.main(["--caption", str(captions), "--type", "clip", "--save_path", str(save_path)])
    # on the command line: one error line naming the file, exit status 2, no traceback
    missing = subprocess.run([sys.executable, str(SCRIPT), "--caption", str(tmp_path / "missing.txt"),
                              "--save_path", str(save_path)], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "missing.txt" in missing.stderr and "Traceback" not in missing.stderr


# ---------------------------------------------------------------- file I/O
def _spd(dim, seed=0):
    a = np.random.default_rng(seed).normal(size=(dim, dim))
    return a @ a.T + dim * np.eye(dim)


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".safetensors"])
def test_load_c_inv_formats(tmp_path, suffix):
    matrix = _spd(6)
    path = tmp_path / f"c_inv{suffix}"
    if suffix == ".npy":
        np.save(path, matrix.astype(np.float32))
    elif suffix == ".pt":
        torch.save(torch.from_numpy(matrix), path)
    else:
        from safetensors.torch import save_file

        save_file({"c_inv": torch.from_numpy(matrix)}, str(path))
    loaded = load_c_inv(path)
    assert loaded.dtype == torch.float64 and loaded.shape == (6, 6)
    np.testing.assert_allclose(loaded.numpy(), matrix, rtol=1e-6 if suffix == ".npy" else 0)


def test_load_c_inv_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="estimate_C_inv.py"):
        load_c_inv(tmp_path / "nope.npy")
    cases = {
        "rect.npy": (np.ones((3, 4)), "square"),
        "asym.npy": (_spd(4) + np.triu(np.ones((4, 4)), 1), "symmetric"),
        "nan.npy": (np.where(np.eye(4) > 0, np.nan, 0.0), "NaN"),
        "neg.npy": (-_spd(4), "positive definite"),
    }
    for name, (matrix, message) in cases.items():
        np.save(tmp_path / name, matrix)
        with pytest.raises(ValueError, match=message) as info:
            load_c_inv(tmp_path / name)
        assert name in str(info.value)
    np.save(tmp_path / "ok.npy", _spd(4))
    with pytest.raises(ValueError, match="width 768"):
        load_c_inv(tmp_path / "ok.npy", expected_dim=768)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="objects.npy"):
        load_c_inv(tmp_path / "objects.npy")


def test_check_positive_definite():
    matrix = _spd(5)
    eigenvalues = check_positive_definite(matrix, "M")
    assert eigenvalues.dtype == torch.float64
    np.testing.assert_allclose(eigenvalues.numpy(), np.linalg.eigvalsh(matrix), rtol=1e-12)
    assert torch.equal(check_positive_definite(torch.from_numpy(matrix).float(), "M"),
                       check_positive_definite(torch.from_numpy(matrix).float().double(), "M"))
    with pytest.raises(ValueError, match=r"^M is not positive definite \(eigenvalues -\S+ \.\. \S+\)\. make it so$"):
        check_positive_definite(-matrix, "M", hint="make it so")
    with pytest.raises(ValueError, match="M contains NaN or infinite values"):
        check_positive_definite(np.full((3, 3), np.inf), "M")
    nearly_singular = np.diag([1.0, 1e-13])
    check_positive_definite(nearly_singular, "M")  # positive definite ...
    with pytest.raises(ValueError, match="M is singular / not positive definite"):
        check_positive_definite(nearly_singular, "M", rcond=1e-12)  # ... but below the accepted condition
    with pytest.raises(ValueError, match=r"refusing to save .*bad\.npy: C\^-1 is not positive definite"):
        save_c_inv(Path("bad.npy"), -matrix, {})


def test_accumulate_second_moment_progress_sees_every_batch():
    encoder = tiny_clip(seed=0)
    seen = []
    plain = accumulate_second_moment(encoder, CAPTIONS, batch_size=8)
    shown = accumulate_second_moment(encoder, CAPTIONS, batch_size=8, progress=lambda b: seen.extend(b) or b)
    assert seen == [0, 8, 16] and torch.equal(plain[0], shown[0]) and plain[1] == shown[1]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        accumulate_second_moment(encoder, CAPTIONS, batch_size=0)


def test_hash_is_stable_and_sensitive():
    matrix = _spd(5)
    assert c_inv_hash(matrix) == c_inv_hash(torch.from_numpy(matrix)) == c_inv_hash(matrix.astype(">f8"))
    changed = matrix.copy()
    changed[0, 0] += 1e-12
    assert c_inv_hash(changed) != c_inv_hash(matrix)
    assert len(c_inv_hash(matrix)) == 16 and int(c_inv_hash(matrix), 16) >= 0
