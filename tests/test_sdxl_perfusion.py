"""Perfusion on SD XL (perfusion.perfusion.PerfusionXL): the full-size concept on the meta device, training the tiny
SD XL-structured model through main.py, the concept reproducing the trained UNet output, two concepts through
perfusion_txt2img.py, family refusals both ways, and C^-1 estimation over the two text encoders."""
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
from omegaconf import OmegaConf
from PIL import Image

from ldm.util import instantiate_from_config
from perfusion.concept_file import concept_size_bytes, load_concept, save_concept
from perfusion.covariance import load_c_inv

REPO = Path(__file__).resolve().parent.parent
TINY_BASES = ["configs/tiny/sdxl-tiny.yaml", "configs/tiny/perfusion-tiny.yaml", "configs/tiny/perfusion-sdxl-tiny.yaml"]
TINY_INFERENCE = "configs/tiny/perfusion-inference-sdxl-tiny.yaml"
FULL_INFERENCE = "configs/perfusion_inference_sdxl.yaml"
FULL_VALUE_FLOATS = 83_200  # o*_V of the 70 cross-attentions: 10 x 640 + 60 x 1280
TINY_SIZES = {"original_size_as_tuple": (32, 32), "crop_coords_top_left": (0, 0), "target_size_as_tuple": (32, 32)}

_spec = importlib.util.spec_from_file_location("estimate_C_inv_sdxl", REPO / "data" / "estimate_C_inv.py")
estimate_C_inv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(estimate_C_inv)


def run_main(args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def txt2img(args):
    from scripts.perfusion_txt2img import main

    return main(args)


@pytest.fixture(scope="module")
def xl_model(tiny_world_sdxl):
    """One tiny SD XL inference model for the tests below (each installs its own concepts)."""
    model = instantiate_from_config(OmegaConf.load(TINY_INFERENCE).model)
    model.init_from_ckpt(str(tiny_world_sdxl.ckpt))
    return model.eval()


# ----- full size, meta device ---------------------------------------------------------------------------------------
def test_full_size_concept_has_83200_value_floats_and_fits_in_370_kb(tmp_path):
    config = OmegaConf.load(FULL_INFERENCE)
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    values, keys = model.value_layers, model.key_layers
    assert len(values) == len(keys) == 70
    assert sum(layer.out_features for layer in values.values()) == FULL_VALUE_FLOATS
    assert {layer.in_features for layer in values.values()} == {2048}
    assert model.cond_stage_model.width == 2048 and model.target_input.shape == (2048,)
    assert model.embedding_manager.embedding_widths == [768, 1280]
    widths = [layer.out_features for layer in values.values()]
    assert concept_size_bytes(widths, 2048) == (FULL_VALUE_FLOATS + 4 * 2048) * 4 == 365_568
    # a real file of that shape: the embedding (768 + 1280) is one of the four 2048-wide vectors
    path = save_concept(tmp_path / "full.safetensors", value_outputs={n: torch.zeros(w) for n, w in zip(values, widths)},
                        embedding=torch.zeros(2048), target_input=torch.ones(2048),
                        c_inv_target_input=torch.ones(2048), superclass_input=torch.ones(2048),
                        metadata=model.concept_metadata())
    size = os.path.getsize(path)
    print(f"\nfull-size SD XL concept file: {size} bytes (tensors 365,568)")
    assert 365_568 < size <= 370 * 1024
    concept = load_concept(path)
    assert concept.metadata["base_model"] == "sdxl" and concept.metadata["embedding_widths"] == [768, 1280]


# ----- tiny SD XL through main.py -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_world_sdxl, tmp_path_factory):
    basedir = tmp_path_factory.mktemp("sdxl_runs")
    result = run_main(["--name", "xl", "--base", *TINY_BASES, "--basedir", str(basedir), "-t", "True",
                       *tiny_world_sdxl.cli_overrides(), "lightning.trainer.max_steps=2",
                       "lightning.callbacks.image_logger.params.batch_frequency=100"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logdirs = [d for d in basedir.iterdir() if d.is_dir()]
    assert len(logdirs) == 1
    return basedir / "xl.safetensors", logdirs[0]


def test_tiny_sdxl_trains_through_main_and_both_embeddings_move(trained, tiny_world_sdxl):
    path, logdir = trained
    concept = load_concept(path)
    meta = concept.metadata
    assert meta["base_model"] == "sdxl" and meta["training_steps"] == 2 and meta["embedding_widths"] == [512, 768]
    assert concept.embedding.shape == concept.target_input.shape == (1280,)
    assert len(concept.value_outputs) == 11  # the tiny UNet's cross-attentions
    clip, open_clip = tiny_world_sdxl.base_model.conditioner.text_encoders
    teddy = int(clip.tokenize(["teddy"])[0, 1])
    start = torch.cat([clip.token_embedding.weight[teddy], open_clip.token_embedding.weight[teddy]]).detach()
    moved = (concept.embedding - start).abs()
    assert moved[:512].max() > 1e-3 and moved[512:].max() > 1e-3  # both encoders' embeddings were trained
    assert (logdir / "images" / "validation" / "step-000002.png").is_file()


def test_concept_reproduces_the_trained_unet_output(trained, tiny_world_sdxl, xl_model):
    """The Lightning checkpoint (concept state of the training model) and the concept file loaded into an inference
    model give the same UNet output at the training gating."""
    path, logdir = trained
    state = torch.load(logdir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    trained_model = instantiate_from_config(tiny_world_sdxl.perfusion_config().model)
    _, unexpected = trained_model.load_state_dict(state["state_dict"], strict=False)
    assert not unexpected and any(k.startswith("embedding_manager.managers.1.") for k in state["state_dict"])
    trained_model.eval().apply_training_targets()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    prompts = {"txt": ["a photo of a *", "a * on the beach"], **TINY_SIZES}
    model = xl_model
    with torch.no_grad():
        expected = trained_model.apply_model(x, t, trained_model.get_learned_conditioning(prompts))
        plain = model.apply_model(x, t, model.get_learned_conditioning({**prompts, "txt": ["a photo of a teddy"] * 2}))
        model.load_concepts([path], beta=0.75, tau=0.10)
        got = model.apply_model(x, t, model.get_learned_conditioning(prompts))
    difference = (got - expected).abs().max().item()
    print(f"\nSD XL concept reload: max |UNet output difference| = {difference:.3g}")
    assert difference <= 1e-5
    assert (got - plain).abs().max() > 1e-4


def _second_concept(world, first_path, out):
    """Another concept on the same base model and C^-1: i* and i_super the encoding of 'dog', other values."""
    first = load_concept(first_path)
    conditioner = world.base_model.conditioner
    with torch.no_grad():
        tokens = conditioner.tokenize(["a dog"])
        i_star = conditioner.encode_tokens(tokens)[0, 2].float()
        clip, open_clip = conditioner.text_encoders
        embedding = torch.cat([clip.token_embedding.weight[tokens[0, 2]], open_clip.token_embedding.weight[tokens[0, 2]]])
    c_inv = load_c_inv(world.c_inv)
    values = {name: 0.5 * value + 0.1 for name, value in first.value_outputs.items()}
    metadata = {k: v for k, v in first.metadata.items() if k not in ("format", "format_version", "value_layers")}
    return save_concept(out, value_outputs=values, embedding=embedding, target_input=i_star,
                        c_inv_target_input=(c_inv @ i_star.double()).float(), superclass_input=i_star.clone(),
                        metadata={**metadata, "superclass": "dog"})


def test_two_sdxl_concepts_combine_in_txt2img_and_with_global_locking(trained, tiny_world_sdxl, xl_model, tmp_path):
    path, _ = trained
    second = _second_concept(tiny_world_sdxl, path, tmp_path / "dog.safetensors")
    outdir = tmp_path / "out"
    code = txt2img(["--config", TINY_INFERENCE, "--ckpt", str(tiny_world_sdxl.ckpt), "--personalized_ckpt",
                    f"{path},{second}", "--prompt", "a {1} next to a {2}", "--negative_prompt", "blurry",
                    "--steps", "2", "--n_samples", "1", "--device", "cpu", "--outdir", str(outdir), "--skip_grid",
                    "--global_locking"])
    assert code == 0
    image = Image.open(outdir / "samples" / "00000.png")
    assert image.size == (32, 32)
    assert image.text["beta"] == "0.6,0.6" and image.text["text"] == "a * next to a &"
    assert image.text["original_size"] == image.text["target_size"] == "32,32"
    assert image.text["global_locking"] == "True"
    assert np.asarray(image).std() > 1
    # in process: both concepts in every edited layer; global locking changes only what the key layers see
    model = xl_model
    model.load_concepts([path, second], placeholders=["*", "&"])
    assert model.edit_state.num_concepts == 2
    assert all(layer.target_output.shape[0] == 2 for layer in model.value_layers.values())
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([500])
    prompt = {"txt": ["a * next to a &"], **TINY_SIZES}
    with torch.no_grad():
        c = model.get_learned_conditioning(prompt)
        local = model.apply_model(x, t, c)
        model.set_global_locking(prompt["txt"], ["a teddy next to a dog"])
        try:
            locked = model.apply_model(x, t, c)
        finally:
            model.set_global_locking(None)
    assert torch.isfinite(locked).all() and (locked - local).abs().max() > 1e-6


def test_size_flags_default_to_the_image_size_and_are_sd_xl_only():
    from types import SimpleNamespace

    from scripts.perfusion_txt2img import UsageError, size_conditioning

    xl, sd1 = OmegaConf.load(TINY_INFERENCE), OmegaConf.load("configs/tiny/perfusion-inference-sd1-tiny.yaml")
    opt = SimpleNamespace(H=64, W=48, original_size=None, target_size="96,80", config=TINY_INFERENCE)
    assert size_conditioning(opt, xl) == {"original_size_as_tuple": (64, 48), "crop_coords_top_left": (0, 0),
                                          "target_size_as_tuple": (96, 80)}
    with pytest.raises(UsageError, match="SD XL"):
        size_conditioning(opt, sd1)


# ----- refusals across families -------------------------------------------------------------------------------------
def _sd1_concept(path):
    return save_concept(path, value_outputs={"layer": torch.ones(4)}, embedding=torch.ones(32),
                        target_input=torch.ones(32), c_inv_target_input=torch.ones(32), superclass_input=torch.ones(32),
                        metadata={"base_model": "sd1", "text_encoder": "FrozenCLIPEmbedder", "placeholder": "*",
                                  "superclass": "teddy", "c_inv_hash": "0"})


def test_concepts_of_other_families_are_refused_with_one_line(trained, tiny_world_sdxl, xl_model, tmp_path, capsys):
    path, _ = trained
    sd1_path = _sd1_concept(tmp_path / "sd1.safetensors")
    with pytest.raises(ValueError, match="base model 'sd1' but this model is 'sdxl'") as error:
        xl_model.load_concepts([sd1_path])
    assert "\n" not in str(error.value)
    sd1_model = instantiate_from_config(OmegaConf.load("configs/tiny/perfusion-inference-sd1-tiny.yaml").model)
    with pytest.raises(ValueError, match="base model 'sdxl' but this model is 'sd1'") as error:
        sd1_model.load_concepts([path])
    assert "\n" not in str(error.value)
    # the command line refuses before building a model, naming the config to use
    for config, concept, hint in (("configs/tiny/perfusion-inference-sd1-tiny.yaml", path, FULL_INFERENCE),
                                  (TINY_INFERENCE, sd1_path, "configs/perfusion_inference.yaml")):
        capsys.readouterr()
        assert txt2img(["--config", config, "--ckpt", str(tiny_world_sdxl.ckpt), "--personalized_ckpt", str(concept),
                        "--device", "cpu", "--outdir", str(tmp_path / "refused")]) == 2
        stderr = capsys.readouterr().err
        lines = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and hint in lines[0] and "base model" in lines[0], stderr


# ----- C^-1 over the two text encoders ----------------------------------------------------------------------------
def test_estimate_c_inv_sdxl_gives_the_context_wide_spd_inverse(tiny_world_sdxl, tmp_path):
    from tests._tiny_concept import toy_captions

    assert estimate_C_inv.ENCODER_TARGETS["sdxl"]["target"] == "ldm.modules.encoders.conditioner.SDXLConditioner"
    assert estimate_C_inv.parse_args(["--caption", "c.txt", "--type", "sdxl", "--save_path", "x.npy"]).type == "sdxl"
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(toy_captions(tiny_world_sdxl.c_inv_captions)) + "\n")
    out = tmp_path / "C_inv_sdxl.npy"
    # the tiny model's encoders (--config) with its checkpoint's conditioner.* weights
    assert estimate_C_inv.main(["--caption", str(captions), "--config", "configs/tiny/sdxl-tiny.yaml", "--ckpt",
                                str(tiny_world_sdxl.ckpt), "--save_path", str(out), "--eps", "1e-6", "--device", "cpu",
                                "--batch_size", "100"]) == 0
    c_inv = load_c_inv(out, expected_dim=1280)  # checks symmetry and positive definiteness
    assert torch.linalg.eigvalsh(c_inv).min() > 0
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["dim"] == 1280 and info["encoder"].startswith("SDXLConditioner")
    # the same as the in-process estimate over the model's own conditioner (real tokens only)
    np.testing.assert_allclose(c_inv.numpy(), load_c_inv(tiny_world_sdxl.c_inv).numpy(), rtol=1e-6, atol=1e-6)
