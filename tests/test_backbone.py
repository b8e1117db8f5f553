"""The SD backbone: real-size parameter counts, checkpoint round trips, bad checkpoints, samplers."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pickle

import pytest
import torch
from omegaconf import OmegaConf

from tests._tiny_models import randomize_zero_parameters, tiny_config, write_tiny_checkpoint
from ldm.util import CheckpointError, instantiate_from_config, load_model_from_config, load_state_dict

def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


PUBLISHED_UNET = {"v1": 859_520_964, "v2": 865_910_724}
PUBLISHED_VAE = 83_653_863


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_real_size_parameter_counts_on_meta_device(version):
    cfg = OmegaConf.load(f"configs/stable-diffusion/{version}-inference.yaml").model.params
    with torch.device("meta"):
        unet = instantiate_from_config(cfg.unet_config)
        vae = instantiate_from_config(cfg.first_stage_config)
    assert count_params(unet) == PUBLISHED_UNET[version]
    assert count_params(vae) == PUBLISHED_VAE


def _outputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        c = model.get_learned_conditioning(["a photo of a teddy", ""])
        return {
            "text": c,
            "eps": model.apply_model(x, torch.tensor([3, 700]), c),
            "decoded": model.decode_first_stage(x),
            "latent_mean": model.encode_first_stage(img).mean,
        }


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_checkpoint_round_trip_has_no_missing_keys_and_same_outputs(tmp_path, family, suffix):
    path = tmp_path / f"tiny{suffix}"
    original = write_tiny_checkpoint(path, family, seed=3)
    state = load_state_dict(path)
    assert any(k.startswith("model.diffusion_model.") for k in state)
    assert any(k.startswith("first_stage_model.") for k in state)
    text_prefix = "cond_stage_model.transformer.text_model." if family == "sd1" else "cond_stage_model.model."
    assert any(k.startswith(text_prefix) for k in state)

    fresh = instantiate_from_config(tiny_config(family).model)  # different random init
    missing, unexpected = fresh.init_from_ckpt(str(path))
    assert missing == [] and unexpected == []

    loaded = load_model_from_config(tiny_config(family), path)
    expected, got = _outputs(original), _outputs(loaded)
    for key in expected:
        assert expected[key].abs().max() > 1e-3, f"{key} output is trivially zero"
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_checkpoint_of_other_family_gives_one_clear_error(tmp_path):
    path = tmp_path / "sd2.safetensors"
    write_tiny_checkpoint(path, "sd2")
    with pytest.raises(CheckpointError) as info:
        load_model_from_config(tiny_config("sd1"), path)
    message = str(info.value)
    assert "Stable Diffusion 2.x" in message and "Stable Diffusion 1.x" in message
    assert "v2-inference.yaml" in message
    assert len(message) < 1200 and message.count("\n") < 3  # one message, not a page of key lists


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/should_not_exist",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_needing_code_execution_is_refused_not_run(tmp_path):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": _Evil()}}, f)
    marker = "/tmp/should_not_exist"
    if os.path.exists(marker):
        os.remove(marker)
    with pytest.raises(CheckpointError, match="refusing"):
        load_state_dict(path)
    assert not os.path.exists(marker)


def test_missing_checkpoint_names_the_file_and_where_weights_go(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.ckpt.*\n.*ckpt/"):
        load_state_dict(tmp_path / "nothere.ckpt")


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    config = tiny_config("sd1").model.params.unet_config
    torch.manual_seed(0)
    plain = instantiate_from_config(config)
    randomize_zero_parameters(plain, torch.Generator().manual_seed(1))  # else zero proj_out hides the context
    config.params.use_checkpoint = True
    checkpointed = instantiate_from_config(config)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 77, 32)
    results = []
    for unet in (plain, checkpointed):
        unet.zero_grad()
        ctx = context.clone().requires_grad_(True)
        out = unet(x, torch.tensor([5, 500]), context=ctx)
        out.pow(2).mean().backward()
        results.append((out.detach(), ctx.grad, unet.input_blocks[1][0].in_layers[2].weight.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert results[0][1].abs().max() > 0  # gradient reaches the text context through cross-attention
