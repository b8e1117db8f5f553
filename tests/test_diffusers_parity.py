"""Our backbone is the same model as diffusers' conversion of the same checkpoint (SD1 and SD2 structures); the
samplers are compared with diffusers' schedulers in test_original_samplers.py."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers
import pytest
import torch

from tests._tiny_models import TINY_CONFIGS, write_tiny_checkpoint

TOL = 1e-4


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def converted(request, tmp_path_factory):
    family = request.param
    path = tmp_path_factory.mktemp(family) / "tiny.safetensors"
    ours = write_tiny_checkpoint(path, family, seed=7)
    config = str(TINY_CONFIGS[family])
    unet = diffusers.UNet2DConditionModel.from_single_file(str(path), original_config=config).eval()
    vae = diffusers.AutoencoderKL.from_single_file(str(path), original_config=config).eval()
    return family, ours, unet, vae


def _max_diff(a, b):
    return (a - b).abs().max().item()


@torch.no_grad()
def test_unet_noise_prediction_matches(converted):
    family, ours, unet, _ = converted
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 77, 32, generator=g)
    t = torch.tensor([1, 421, 999])
    expected = unet(x, t, encoder_hidden_states=context).sample
    got = ours.apply_model(x, t, context)
    assert expected.std() > 0.05
    assert _max_diff(got, expected) <= TOL


@torch.no_grad()
def test_vae_encode_decode_match(converted):
    family, ours, _, vae = converted
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(2, 4, 8, 8, generator=g)
    assert _max_diff(ours.encode_first_stage(image).mean, vae.encode(image).latent_dist.mean) <= TOL
    assert _max_diff(ours.encode_first_stage(image).logvar, vae.encode(image).latent_dist.logvar) <= TOL
    assert _max_diff(ours.first_stage_model.decode(z), vae.decode(z).sample) <= TOL
    # the scale factor of the latent space is the same as diffusers' vae config
    assert ours.scale_factor == pytest.approx(vae.config.scaling_factor)
