"""The shipped toy base model (ckpt/toy/): it loads through the public paths, draws what it is asked for (read by
the toy oracle), its C^-1 is what data/estimate_C_inv.py makes, its shipped concept works, and make demo's steps
run (at reduced steps)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TOY = REPO / "ckpt" / "toy"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def run(args, timeout=900):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def load_toy_model():
    from omegaconf import OmegaConf

    from ldm.util import load_model_from_config

    return load_model_from_config(OmegaConf.load("configs/toy/inference.yaml"), TOY / "base.safetensors")


@pytest.fixture(scope="module")
def toy_model():
    return load_toy_model()


def test_shipped_files_are_small_and_present():
    for name in ("base.safetensors", "C_inv.npy", "toy_dots.safetensors", "README.md"):
        assert (TOY / name).is_file(), name
    total = sum(p.stat().st_size for p in TOY.rglob("*") if p.is_file())
    assert total < 30 * 1024 * 1024, total


def test_the_seeds_command_samples_the_base_model(tmp_path):
    result = run(["scripts/perfusion_txt2img.py", "--config", "configs/toy/inference.yaml", "--ckpt",
                  TOY / "base.safetensors", "--prompt", "a red star on a white background", "--n_samples", 4,
                  "--n_iter", 1, "--steps", 20, "--outdir", tmp_path])
    assert result.returncode == 0, result.stderr[-3000:]
    from PIL import Image

    from data.toy_oracle import check, read_image

    samples = sorted((tmp_path / "samples").glob("*.png"))
    assert len(samples) == 4 and all(Image.open(p).size == (32, 32) for p in samples)
    checks = [check(read_image(p), "a red star on a white background") for p in samples]
    assert sum(c["colour"] for c in checks) >= 3 and sum(c["background"] for c in checks) >= 3


def test_base_model_follows_prompts_well_above_chance(toy_model):
    from scripts.toy_eval import prompt_sets, sample, score

    prompts = prompt_sets(16, seed=5)["seen"]
    scores = score(sample(toy_model, prompts, steps=20, scale=4.0, seed=5), prompts)
    # chance: colour 1/4, shape 1/4, background 1/2
    assert scores["colour"] >= 0.8 and scores["background"] >= 0.8 and scores["shape"] >= 0.6, scores


def test_readout_empties_the_positions_each_variant_leaves_out(toy_model):
    from scripts.toy_eval import READOUTS, readout, readout_contexts

    prompts = ["a red star on a white background", "a photo of a blue square"]
    contexts = readout_contexts(toy_model, prompts)
    full, empty = contexts["full"], toy_model.get_learned_conditioning([""])[0]
    # BOS a red star on a white background EOS: noun at 3, EOS at 8; BOS a photo of a blue square EOS: 6, 7
    for row, (noun, eos) in enumerate([(3, 8), (6, 7)]):
        kept = {name: [i for i in range(full.shape[1]) if torch.equal(contexts[name][row, i], full[row, i])
                       and not torch.equal(full[row, i], empty[i])] for name in READOUTS}
        assert kept["words only"] == list(range(1, eos))
        assert kept["summary only"] == list(range(eos, full.shape[1]))
        assert kept["up to the noun"] == list(range(1, noun + 1))
        assert kept["noun alone"] == [noun]
        for name in READOUTS:
            dropped = [i for i in range(full.shape[1]) if i not in kept[name]]
            assert all(torch.equal(contexts[name][row, i], empty[i]) for i in dropped)
    with pytest.raises(ValueError, match="one shape word"):
        readout_contexts(toy_model, ["a red star and a blue square on a black background"])
    scores = readout(toy_model, n=8, steps=10, seed=2)
    assert list(scores) == list(READOUTS)
    assert scores["full"]["shape"] >= 0.75 and scores["full"]["colour"] >= 0.75, scores


def test_base_model_binds_colours_to_shapes_in_two_object_prompts(toy_model):
    from scripts.toy_eval import prompt_sets, sample, score

    prompts = prompt_sets(16, seed=7)["two"]
    scores = score(sample(toy_model, prompts, steps=20, scale=4.0, seed=7), prompts)
    # chance that both objects come out right and bound: about (1/4 * 1/4)^2 = 0.4 %
    assert scores["count"] >= 0.8 and scores["both"] >= 0.5, scores


def test_shipped_c_inv_is_reproduced_by_estimate_c_inv(tmp_path):
    from perfusion.covariance import load_c_inv

    captions = tmp_path / "captions.txt"
    assert run(["data/toy_world.py", "--captions", captions]).returncode == 0
    result = run(["data/estimate_C_inv.py", "--caption", captions, "--config", "configs/toy/inference.yaml",
                  "--ckpt", TOY / "base.safetensors", "--save_path", tmp_path / "C_inv.npy"])
    assert result.returncode == 0, result.stderr[-2000:]
    shipped, fresh = load_c_inv(TOY / "C_inv.npy", expected_dim=128), load_c_inv(tmp_path / "C_inv.npy")
    assert torch.allclose(shipped, fresh, rtol=1e-6, atol=1e-8 * float(shipped.abs().max()))
    assert torch.linalg.eigvalsh(shipped).min() > 0


def test_shipped_concept_edits_its_word_and_leaves_other_prompts_alone(toy_model):
    """Perfusion's locality: with the concept loaded, prompts without its placeholder sample (almost) the same
    images as the base model, while the placeholder changes the picture."""
    from perfusion.concept_file import load_concept
    from scripts.toy_eval import sample

    concept = load_concept(TOY / "toy_dots.safetensors")
    assert concept.metadata["superclass"] == "square" and concept.metadata["base_model"] == "sd1"
    edited = load_toy_model()
    edited.load_concepts([concept], beta=0.7, tau=0.15)

    def images(model, prompt):
        return np.stack(sample(model, [prompt] * 4, steps=10, scale=4.0, seed=3)).astype(np.float64)

    other = "a red circle on a black background"
    unchanged = np.abs(images(edited, other) - images(toy_model, other)).mean()
    changed = np.abs(images(edited, "a photo of a *") - images(toy_model, "a photo of a square")).mean()
    assert unchanged < 3.0 and changed > 20.0, (unchanged, changed)  # mean over pixels, in 0..255 units


def test_demo_runs_at_reduced_steps(tmp_path):
    out = tmp_path / "demo"
    earlier = out / "samples" / "plain-perfusion" / "samples"  # a sample left by an earlier run of the demo
    earlier.mkdir(parents=True)
    (earlier / "00000.png").write_bytes((REPO / "docs" / "toy_demo.png").read_bytes())
    result = run(["scripts/demo.py", "--outdir", out, "--train_steps", 6, "--steps", 5, "--n_samples", 2,
                  "--show", 2])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    from PIL import Image

    cell = sorted(earlier.glob("*.png"))
    assert len(cell) == 2 and all(Image.open(p).size == (32, 32) for p in cell)  # this run's samples only
    assert (out / "demo_sheet.png").is_file() and (out / "logs" / "toy_star.safetensors").is_file()
    scores = json.loads((out / "scores.json").read_text())
    assert len(scores) == 5 and "found toy_star" in scores["plain"]
    assert "found toy_dots" in scores["two concepts"]
    assert list((out / "logs").glob("*_toy_star/tensorboard/events.out.tfevents.*"))
    assert "Sheet:" in result.stdout
    assert scores["plain"]["found toy_star"] < 0.5  # 6 training steps do not teach it; the demo says what to try
    assert "DEMO_ARGS='--seed" in result.stdout
