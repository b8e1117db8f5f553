"""Ablation switches and baselines (docs/method.md section 10): what each one trains, and that its learned concept
saves and reloads into an inference model with the same UNet outputs."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf
from torch.utils.data import default_collate

from ldm.util import instantiate_from_config
from perfusion.concept_file import load_concept
from perfusion.roe import RankOneEditLinear, edited_layers

PROMPTS = ["a photo of a * on the beach", "a painting of a *"]


def tiny_batch(config, n=2):
    dataset = instantiate_from_config(OmegaConf.merge(config.data.params.train, {"params": {
        "placeholder_token": "*", "superclass": "teddy", "flip_p": 0.0}}))
    return default_collate([dataset[i] for i in range(n)])


def train_step(model, batch):
    """One optimizer step on a fixed batch (fixed noise); returns the gradients and the state before the step."""
    optimizer = model.configure_optimizers()
    model.train()
    torch.manual_seed(0)
    loss, _ = model.shared_step(batch)
    optimizer.zero_grad()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    before = {n: v.detach().clone() for n, v in model.state_dict().items()}
    optimizer.step()
    return grads, before


@pytest.fixture(scope="module")
def inference(tiny_world):
    """The inference model of the tiny world (edited K/V layers, no concept until one is loaded)."""
    config = tiny_world.perfusion_config(**{
        "model.params.C_inv_path": None, "model.params.personalization_config.params.initializer_words": []})
    return instantiate_from_config(config.model).eval()


def unet_outputs(model, prompts=PROMPTS):
    x = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([10, 600][:len(prompts)])
    with torch.no_grad():
        return model.apply_model(x, t, model.get_learned_conditioning(prompts))


@pytest.fixture(scope="module")
def trained_keys(tiny_world, tmp_path_factory):
    """A tiny Perfusion model with ``lock_keys: false`` after one optimizer step, its gradients and state before the
    step (the first batch has initialised the targets), and its concept file."""
    model = instantiate_from_config(tiny_world.perfusion_config(**{"model.params.lock_keys": False}).model)
    grads, before = train_step(model, tiny_batch(tiny_world.perfusion_config()))
    path = model.eval().save_concept_file(tmp_path_factory.mktemp("keys") / "keys.safetensors")
    return model, before, grads, path


def test_lock_keys_false_trains_the_key_outputs_like_the_values(trained_keys):
    model, before, grads, _ = trained_keys
    keys, values = model.key_layers, model.value_layers
    assert len(keys) == len(values) == 7
    expected = {"embedding_manager.embeddings"} | {f"model.diffusion_model.{n}.target_output" for n in keys} | {
        f"model.diffusion_model.{n}.target_output" for n in values}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert set(grads) == expected and all(g.abs().max() > 0 for g in grads.values())
    optimizer = model.configure_optimizers()
    groups = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert all(groups[id(l.target_output)] == model.target_output_learning_rate for l in keys.values())
    for name, layer in keys.items():
        # initialised as o*_V is, W_K i_super (the first batch's), then trained away from it
        initial = before[f"model.diffusion_model.{name}.target_output"]
        torch.testing.assert_close(initial[0], layer.weight @ model.superclass_input, rtol=0, atol=1e-6)
        assert (layer.target_output - initial).abs().max() > 1e-4, name


def test_trained_keys_concept_stores_the_keys_and_reloads_with_identical_unet_outputs(trained_keys, inference):
    model, _, _, path = trained_keys
    concept = load_concept(path)
    assert concept.metadata["lock_keys"] is False and concept.format_version == 2
    assert list(concept.key_outputs) == list(model.key_layers)
    for name, layer in model.key_layers.items():
        assert torch.equal(concept.key_outputs[name], layer.target_output[0].detach())

    fresh = inference
    fresh.load_concepts([path], beta=model.train_beta, tau=model.train_tau)
    model.apply_training_targets()
    expected = unet_outputs(model)
    torch.testing.assert_close(unet_outputs(fresh), expected, rtol=0, atol=1e-5)
    for name, layer in fresh.key_layers.items():  # loading applied the stored keys, not W_K i_super
        assert torch.equal(layer.target_output[0], concept.key_outputs[name])
        assert (layer.target_output[0] - layer.weight @ concept.superclass_input).abs().max() > 1e-3
    # the same concept read as locked (a version-1 reader's view) predicts otherwise
    fresh.load_concepts([dataclasses.replace(concept, key_outputs=None)], beta=model.train_beta, tau=model.train_tau)
    assert (unet_outputs(fresh) - expected).abs().max() > 1e-7


@pytest.fixture(scope="module")
def textual_inversion(tiny_world, tmp_path_factory):
    config = tiny_world.perfusion_config(**{"model.target": "perfusion.baselines.TextualInversion",
                                            "model.params.C_inv_path": None})
    model = instantiate_from_config(config.model)
    grads, before = train_step(model, tiny_batch(config))
    path = model.eval().save_concept_file(tmp_path_factory.mktemp("ti") / "ti.safetensors")
    return model, before, grads, path


def test_textual_inversion_trains_only_the_embedding_of_a_plain_unet(textual_inversion):
    model, before, grads, _ = textual_inversion
    unet = model.model.diffusion_model
    assert not edited_layers(unet) and not any(isinstance(m, RankOneEditLinear) for m in unet.modules())
    projections = [getattr(m, a) for n, m in unet.named_modules() if n.endswith("attn2") for a in ("to_k", "to_v")]
    assert len(projections) == 14 and all(type(p) is nn.Linear for p in projections)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"embedding_manager.embeddings"}
    assert set(grads) == {"embedding_manager.embeddings"} and grads["embedding_manager.embeddings"].abs().max() > 0
    after = model.state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} <= {
        "embedding_manager.embeddings", "target_input", "superclass_input", "targets_initialized"}
    assert not torch.equal(before["embedding_manager.embeddings"], after["embedding_manager.embeddings"])
    assert len(model.configure_optimizers().param_groups) == 1


def test_textual_inversion_concept_is_the_embedding_alone_and_gives_the_base_unet(textual_inversion, trained_keys,
                                                                                     inference):
    model, _, _, path = textual_inversion
    concept = load_concept(path)
    assert not concept.has_edit and concept.format_version == 2 and concept.key_outputs is None
    assert concept.metadata["method"] == "textual_inversion" and concept.metadata["c_inv_hash"] is None
    assert torch.equal(concept.embedding, model.embedding_manager.embeddings[0].detach())
    assert os.path.getsize(path) < 1024
    print(f"\ntiny TI concept file: {os.path.getsize(path)} bytes")

    fresh = inference
    fresh.load_concepts([path])
    assert fresh.edit_state.num_concepts == 0  # edited layers give exactly W e
    expected = unet_outputs(model)
    torch.testing.assert_close(unet_outputs(fresh), expected, rtol=0, atol=1e-5)
    with torch.no_grad():  # = the plain base UNet given the learned word
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        fresh.edit_state.set_enabled(False)
        plain = fresh.apply_model(x, torch.tensor([10, 600]), fresh.get_learned_conditioning(PROMPTS))
        fresh.edit_state.set_enabled(True)
    torch.testing.assert_close(plain, expected, rtol=0, atol=1e-5)

    # with a Perfusion concept: both words are installed, the edit holds the Perfusion concept alone
    keys_path = trained_keys[3]
    fresh.load_concepts([path, keys_path], placeholders=["*", "&"], beta=[0.5, 0.7], tau=[0.2, 0.15])
    assert fresh.edit_state.num_concepts == 1 and fresh.embedding_manager.placeholder_strings == ["*", "&"]
    together = unet_outputs(fresh, ["a photo of a & on the beach"])
    fresh.load_concepts([keys_path], placeholders=["&"])
    torch.testing.assert_close(together, unet_outputs(fresh, ["a photo of a & on the beach"]), rtol=0, atol=1e-6)


def test_dreambooth_fine_tunes_every_unet_weight_and_nothing_else(tiny_world):
    """configs/toy/dreambooth_star.yaml's model and data settings on the tiny world: a plain LatentDiffusion from the
    base checkpoint, captions with a rare word before the super-class word, no masks."""
    toy = OmegaConf.load("configs/toy/dreambooth_star.yaml")
    assert toy.model.target == "ldm.models.diffusion.ddpm.LatentDiffusion" and not toy.model.params.cond_stage_trainable
    data = dict(toy.data.params.train.params)
    assert data["placeholder_token"] == "sks star" and data["use_masks"] is False and "personalization_config" not in (
        toy.model.params)
    config = OmegaConf.merge(OmegaConf.load(tiny_world.base_config), {"model": {"params": {
        "ckpt_path": str(tiny_world.ckpt), "cond_stage_key": "caption", "use_ema": False}}})
    model = instantiate_from_config(config.model)
    dataset = instantiate_from_config({"target": toy.data.params.train.target, "params": {
        **{k: data[k] for k in ("placeholder_token", "superclass", "templates", "use_masks")},
        "data_root": str(tiny_world.data_root), "size": 32, "flip_p": 0.0}})
    batch = default_collate([dataset[i] for i in range(2)])
    assert batch["caption"][0] == "a photo of a sks star" and torch.equal(batch["mask"], torch.ones_like(batch["mask"]))
    model.train()
    torch.manual_seed(0)
    loss, _ = model.shared_step(batch)
    loss.backward()
    unet = dict(model.model.diffusion_model.named_parameters())
    assert all(p.grad is not None for p in unet.values())
    moving = [n for n, p in unet.items() if p.grad.abs().max() > 0]
    assert len(moving) > 0.9 * len(unet) and any(n.endswith("attn2.to_k.weight") for n in moving)
    assert all(p.grad is None for p in model.cond_stage_model.parameters())  # the text encoder stays frozen
    assert all(p.grad is None for p in model.first_stage_model.parameters())
    optimizer = model.configure_optimizers()
    assert sum(p.numel() for p in optimizer.param_groups[0]["params"]) == sum(p.numel() for p in unet.values())


def test_dreambooth_through_main_exports_a_checkpoint_in_the_base_layout(tmp_path):
    """Two steps of configs/toy/dreambooth_star.yaml through main.py: the exported base checkpoint has the layout
    and dtypes of ckpt/toy/base.safetensors (what perfusion_txt2img.py --ckpt loads), moved UNet weights and the
    base model's text encoder."""
    from safetensors.torch import load_file

    from tests.test_training_cli import only_logdir, run_main

    result = run_main(["--name", "db", "--base", "configs/toy/dreambooth_star.yaml", "--basedir", str(tmp_path),
                       "-t", "True", "lightning.trainer.max_steps=2", "data.params.batch_size=2"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    exported = only_logdir(tmp_path) / "checkpoints" / "base-last.safetensors"
    state, base = load_file(exported), load_file("ckpt/toy/base.safetensors")
    assert set(state) == set(base) and all(state[k].dtype == base[k].dtype for k in base)
    changed = [k for k in base if k.startswith("model.") and not torch.equal(state[k], base[k])]
    assert any(k.endswith("attn2.to_k.weight") for k in changed)
    assert all(torch.equal(state[k], base[k]) for k in base if k.startswith("cond_stage_model."))
