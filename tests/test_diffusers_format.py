"""A base model in the diffusers folder format (``save_pretrained``) loads through ``--ckpt`` /
``model.params.ckpt_path`` as the same model as the single-file checkpoint it was made from (SD1 and SD2 structures,
.safetensors and .bin); a .bin whose pickle would run code, and a folder of the other family, are refused.

The folders are written by diffusers itself (a test-only dependency, tests/_tiny_pipelines.py): UNet and VAE by
``from_single_file`` of the tiny checkpoint with our tiny yaml, the text encoder by diffusers' own conversion of the
checkpoint's ``cond_stage_model.*`` (SD2: one block shorter, as diffusers' SD 2.x text encoders are), so our reverse
mapping is checked against theirs.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.diffusers_format import folder_family
from ldm.util import CheckpointError, load_model_from_config
from tests._tiny_models import REPO_ROOT, TINY_CONFIGS, write_tiny_checkpoint
from tests._tiny_pipelines import tiny_pipeline

INFERENCE_CONFIGS = {"sd1": REPO_ROOT / "configs/tiny/perfusion-inference-sd1-tiny.yaml",
                     "sd2": REPO_ROOT / "configs/tiny/perfusion-inference-sd2-tiny.yaml"}
SAMPLE_TOL = 1e-5


def _as_transformers4_bin(text_encoder: Path) -> None:
    """Rewrite a text_encoder/ folder as transformers 4 did: pytorch_model.bin with keys under text_model."""
    from safetensors.torch import load_file

    for file in text_encoder.glob("model*.safetensors"):
        torch.save({f"text_model.{k}": v for k, v in load_file(str(file)).items()},
                   text_encoder / "pytorch_model.bin")
        file.unlink()


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def tiny_base(request, tmp_path_factory):
    """(family, single-file checkpoint, diffusers folder of it (.safetensors), the same with .bin files)."""
    family = request.param
    root = tmp_path_factory.mktemp(f"diffusers-{family}")
    checkpoint = root / "tiny.safetensors"
    write_tiny_checkpoint(checkpoint, family, seed=11)
    pipe = tiny_pipeline(family, checkpoint)
    pipe.save_pretrained(str(root / "pipeline"))
    pipe.save_pretrained(str(root / "pipeline-bin"), safe_serialization=False)
    _as_transformers4_bin(root / "pipeline-bin" / "text_encoder")  # transformers 5 writes safetensors regardless
    return family, checkpoint, root / "pipeline", root / "pipeline-bin"


def _expected_unused(model) -> set[str]:
    return {f"cond_stage_model.{name}" for name in getattr(model.cond_stage_model, "unused_weight_names", list)()}


def assert_same_state(reference, loaded, family: str) -> None:
    """Every key of the single-file model is in the folder-loaded one with an identical tensor, except (SD2) the
    weights diffusers' text encoder does not hold and ours does not use."""
    ours, theirs = reference.state_dict(), loaded.state_dict()
    assert set(ours) == set(theirs)
    unused = _expected_unused(reference)
    if family == "sd2":  # the last OpenCLIP block, text_projection and logit_scale
        assert "cond_stage_model.model.text_projection" in unused
        assert any(".resblocks.2." in k for k in unused) and not any(".resblocks.1." in k for k in unused)
    else:
        assert unused == set()
    different = [k for k in ours if k not in unused and not torch.equal(ours[k], theirs[k])]
    assert different == []
    assert len(ours) - len(unused) > 500  # UNet, VAE, text encoder and schedule all compared


@torch.no_grad()
def _sample(model, steps: int = 3):
    from sgm.sampling import original_sampler, sample

    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    c = model.get_learned_conditioning(["a photo of a dog", "a red star"])
    uc = model.get_learned_conditioning(["", ""])
    sampler = original_sampler(model, "ddim", steps=steps, scale=5.0, eta=0.0)
    return model.decode_first_stage(sample(model, c, x_T, uc, sampler=sampler))


def test_folder_loads_as_the_single_file_model_with_the_same_samples(tiny_base):
    family, checkpoint, folder, _ = tiny_base
    config = OmegaConf.load(TINY_CONFIGS[family])
    assert folder_family(folder)[0] == family
    reference = load_model_from_config(config, checkpoint)
    torch.manual_seed(123)  # the weights the folder lacks (SD2) start elsewhere: they must not matter
    loaded = load_model_from_config(config, folder)
    assert_same_state(reference, loaded, family)
    expected, got = _sample(reference), _sample(loaded)
    assert expected.std() > 0.01
    assert (got - expected).abs().max().item() <= SAMPLE_TOL


def test_bin_folder_loads_too_with_text_model_level_keys(tiny_base):
    """save_pretrained(safe_serialization=False): diffusion_pytorch_model.bin for UNet and VAE, and a text encoder
    pytorch_model.bin with transformers 4's text_model. keys; all read with torch.load(weights_only=True)."""
    family, checkpoint, _, bin_folder = tiny_base
    for part, name in (("unet", "diffusion_pytorch_model.bin"), ("vae", "diffusion_pytorch_model.bin"),
                       ("text_encoder", "pytorch_model.bin")):
        assert (bin_folder / part / name).is_file()
        assert not list((bin_folder / part).glob("*.safetensors"))
    config = OmegaConf.load(TINY_CONFIGS[family])
    reference = load_model_from_config(config, checkpoint)
    assert_same_state(reference, load_model_from_config(config, bin_folder), family)


class _RunsCode:
    def __reduce__(self):  # would run a shell command if unpickled; the loader must never do that
        return (os.system, ("touch PWNED",))


def test_bin_whose_pickle_would_run_code_is_refused_with_the_file_and_the_fix(tiny_base, tmp_path, monkeypatch):
    family, checkpoint, folder, _ = tiny_base
    if family == "sd2":
        pytest.skip("one family is enough")
    evil = tmp_path / "evil"
    shutil.copytree(folder, evil)
    (evil / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with open(evil / "unet" / "diffusion_pytorch_model.bin", "wb") as handle:
        pickle.dump({"conv_in.weight": _RunsCode()}, handle, protocol=2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_model_from_config(OmegaConf.load(TINY_CONFIGS[family]), evil)
    message = str(err.value)
    assert "diffusion_pytorch_model.bin" in message and "would run code" in message
    assert "safe_serialization=True" in message
    assert not (tmp_path / "PWNED").exists()


def test_folder_of_the_other_family_is_refused_naming_the_config_to_use(tiny_base):
    family, checkpoint, folder, _ = tiny_base
    other = "sd1" if family == "sd2" else "sd2"
    with pytest.raises(CheckpointError) as err:
        load_model_from_config(OmegaConf.load(TINY_CONFIGS[other]), folder)
    message = str(err.value)
    assert str(folder) in message and ("2.x" if family == "sd2" else "1.x") in message
    assert ("perfusion_inference_sd_v2.yaml" if family == "sd2" else "perfusion_inference.yaml") in message


def test_prediction_type_that_differs_from_the_config_is_refused(tiny_base):
    family, checkpoint, folder, _ = tiny_base
    if family == "sd1":
        pytest.skip("the SD2 tiny model is the v-prediction one")
    config = OmegaConf.load(TINY_CONFIGS[family])
    config.model.params.parameterization = "eps"
    with pytest.raises(CheckpointError, match="v_prediction.*parameterization: v"):
        load_model_from_config(config, folder)


def test_txt2img_takes_the_folder_as_ckpt_and_draws_the_same_images(tiny_base, tmp_path):
    from scripts.perfusion_txt2img import main

    family, checkpoint, folder, _ = tiny_base
    if family == "sd1":
        pytest.skip("one family is enough for the command line (both are sampled above)")
    images = []
    for name, ckpt in (("file", checkpoint), ("folder", folder)):
        args = ["--config", str(INFERENCE_CONFIGS[family]), "--ckpt", str(ckpt), "--prompt", "a photo of a cat",
                "--n_samples", "1", "--steps", "2", "--device", "cpu", "--outdir", str(tmp_path / name),
                "--skip_grid"]
        assert main(args) == 0
        images.append(np.asarray(Image.open(tmp_path / name / "samples" / "00000.png")))
    assert np.array_equal(images[0], images[1])


def test_a_folder_that_is_not_a_model_is_named(tmp_path, capsys):
    from scripts.perfusion_txt2img import main

    (tmp_path / "unet").mkdir()
    assert main(["--config", str(INFERENCE_CONFIGS["sd1"]), "--ckpt", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert str(tmp_path) in error and "vae/config.json" in error and "text_encoder/config.json" in error


REAL_SIZE = {  # diffusers' own classes at the sizes of the released SD 1.5 and SD 2.1 folders (their config.json)
    "sd1": dict(config="configs/stable-diffusion/v1-inference.yaml",
                unet=dict(cross_attention_dim=768, attention_head_dim=8),
                text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          hidden_act="quick_gelu")),
    "sd2": dict(config="configs/stable-diffusion/v2-inference.yaml",
                unet=dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
                text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                          hidden_act="gelu")),
}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_real_size_layouts_map_onto_every_weight_of_ours_with_its_shape(family):
    """On the meta device (no memory, no weights): the released models' layouts (4 resolutions, 2 resnets per
    block, 24-block OpenCLIP) convert to exactly our state dict's names and shapes, but for the weights diffusers'
    SD 2.x text encoder lacks, which are the ones ours does not use."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.diffusers_format import (convert_clip_text_encoder, convert_open_clip_text_encoder, convert_unet,
                                      convert_vae)
    from ldm.util import instantiate_from_config

    sizes = REAL_SIZE[family]
    with torch.device("meta"):
        model = instantiate_from_config(OmegaConf.load(REPO_ROOT / sizes["config"]).model)
        unet = diffusers.UNet2DConditionModel(**sizes["unet"])
        vae = diffusers.AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                                      down_block_types=["DownEncoderBlock2D"] * 4,
                                      up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4)
        text = CLIPTextModel(CLIPTextConfig(**sizes["text"]))
    converted = {f"model.diffusion_model.{k}": v for k, v in convert_unet(unet.state_dict(), unet.config).items()}
    converted.update({f"first_stage_model.{k}": v for k, v in convert_vae(vae.state_dict(), vae.config).items()})
    if family == "sd1":
        text_weights = {f"cond_stage_model.transformer.text_model.{k}": v
                        for k, v in convert_clip_text_encoder(text.state_dict()).items()}
    else:
        text_weights = {f"cond_stage_model.model.{k}": v
                        for k, v in convert_open_clip_text_encoder(text.state_dict()).items()}
    converted.update(text_weights)
    ours = {k: v for k, v in model.state_dict().items() if k.startswith(("model.", "first_stage_model.",
                                                                        "cond_stage_model."))}
    assert set(converted) <= set(ours)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(ours[k].shape) for k in converted}
    assert set(ours) - set(converted) == _expected_unused(model)
    assert len(converted) > 1100


@torch.no_grad()
def test_estimate_c_inv_reads_the_text_encoder_from_a_folder(tiny_base):
    """data/estimate_C_inv.py --ckpt <folder>: the same encodings as with the single-file checkpoint."""
    from argparse import Namespace

    from data.estimate_C_inv import build_encoder

    family, checkpoint, folder, _ = tiny_base
    encoders = [build_encoder(Namespace(encoder_config=None, config=str(TINY_CONFIGS[family]), type=None,
                                        ckpt=str(ckpt), ckpt_prefix="cond_stage_model.", seed=seed, device="cpu"))[0]
                for ckpt, seed in ((checkpoint, 0), (folder, 1))]
    prompts = ["a photo of a dog", ""]
    assert torch.equal(encoders[0].encode(prompts), encoders[1].encode(prompts))
