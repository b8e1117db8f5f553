"""The Perfusion module in process: what trains, the masked loss, concept files and their size."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import default_collate

from ldm.util import instantiate_from_config
from perfusion.concept_file import load_concept, save_concept
from perfusion.embedding_manager import PlaceholderError
from perfusion.perfusion import masked_diffusion_loss
from perfusion.roe import EditState, edited_layers, swap_cross_attention_projections


@pytest.fixture(scope="module")
def trained(tiny_world):
    """A tiny Perfusion model after 6 optimizer steps on one fixed batch (fixed noise and timesteps)."""
    config = tiny_world.perfusion_config()
    model = instantiate_from_config(config.model)
    dataset = instantiate_from_config(OmegaConf.merge(config.data.params.train, {"params": {
        "placeholder_token": "*", "superclass": "teddy", "flip_p": 0.0}}))
    batch = default_collate([dataset[i] for i in range(2)])
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = model.configure_optimizers()
    model.train()
    losses = []
    for step in range(6):
        torch.manual_seed(0)
        loss, _ = model.shared_step(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step == 0:  # the first batch locked the keys; from here on they must not move
            locked_keys = {n: l.target_output.detach().clone()
                           for n, l in edited_layers(model.model.diffusion_model, "key").items()}
    torch.manual_seed(0)
    with torch.no_grad():
        losses.append(model.shared_step(batch)[0].item())
    model.locked_keys_after_first_step = locked_keys
    return model.eval(), before, losses, batch


def test_masked_loss_on_fixed_batch_decreases(trained):
    _, _, losses, _ = trained
    assert losses[-1] < losses[0] - 1e-3, losses


def test_only_embedding_and_value_outputs_are_trained(trained):
    model, before, _, _ = trained
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    values = {n for n in trainable if n.endswith("attn2.to_v.target_output")}
    assert trainable == {"embedding_manager.embeddings"} | values
    assert len(values) == len(edited_layers(model.model.diffusion_model, "value")) == 7
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    statistics = {"target_input", "superclass_input", "targets_initialized"}
    key_targets = {k for k in before if k.endswith("to_k.target_output")}
    # Key outputs are set once (locked to W_K i_super) by the first batch, then never change.
    assert changed - statistics - key_targets == {"embedding_manager.embeddings"} | values
    for name, layer in edited_layers(model.model.diffusion_model, "key").items():
        torch.testing.assert_close(layer.target_output[0], layer.weight @ model.superclass_input, rtol=0, atol=1e-6)
        assert torch.equal(layer.target_output, model.locked_keys_after_first_step[name])
        assert layer.target_output.grad is None and layer.weight.grad is None


def test_masked_loss_ignores_pixels_outside_the_mask():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.zeros(2, 32, 32)
    mask[:, :, :16] = 1.0  # left half of the image = left half of the latent
    loss = masked_diffusion_loss(pred, target, mask)
    expected = (pred - target)[..., :4].pow(2).mean()
    torch.testing.assert_close(loss, expected)
    pred2 = pred.clone()
    pred2[..., 4:] += 10.0  # errors outside the mask do not count
    torch.testing.assert_close(masked_diffusion_loss(pred2, target, mask), loss)
    torch.testing.assert_close(masked_diffusion_loss(pred, target, torch.ones(2, 32, 32)), (pred - target).pow(2).mean())


def test_concept_file_reloads_into_an_inference_model_with_identical_unet_outputs(trained, tiny_world, tmp_path):
    model, _, _, batch = trained
    path = model.save_concept_file(tmp_path / "teddy.safetensors")
    concept = load_concept(path)
    assert concept.metadata["placeholder"] == "*" and concept.metadata["superclass"] == "teddy"
    assert concept.metadata["c_inv_hash"] == model.c_inv_hash
    assert concept.target_input.shape == (32,) and len(concept.value_outputs) == 7

    inference_config = tiny_world.perfusion_config(**{
        "model.params.C_inv_path": None, "model.params.personalization_config.params.initializer_words": []})
    fresh = instantiate_from_config(inference_config.model).eval()
    fresh.load_concepts([path], beta=model.train_beta, tau=model.train_tau)
    model.apply_training_targets()

    prompts = ["a photo of a * on the beach", "a painting of a *"]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([10, 600])
    with torch.no_grad():
        c_trained, c_fresh = model.get_learned_conditioning(prompts), fresh.get_learned_conditioning(prompts)
        torch.testing.assert_close(c_fresh, c_trained, rtol=0, atol=1e-6)
        expected = model.apply_model(x, t, c_trained)
        got = fresh.apply_model(x, t, c_fresh)
        plain = fresh.apply_model(x, t, fresh.cond_stage_model.encode(["a photo of a teddy on the beach"] * 2))
    assert (expected - plain).abs().max() > 1e-4  # the concept changes the prediction
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_sd15_concept_file_is_at_most_64_kb(tmp_path):
    config = OmegaConf.load("configs/stable-diffusion/v1-inference.yaml").model.params
    with torch.device("meta"):
        unet = instantiate_from_config(config.unet_config)
    layers = swap_cross_attention_projections(unet, EditState())
    values = {n: torch.randn(l.out_features) for n, l in layers.items() if l.role == "value"}
    assert len(values) == 16 and sum(v.numel() for v in values.values()) == 12_480
    dim = 768
    path = save_concept(tmp_path / "sd15.safetensors", value_outputs=values, embedding=torch.randn(dim),
                        target_input=torch.randn(dim), c_inv_target_input=torch.randn(dim),
                        superclass_input=torch.randn(dim),
                        metadata={"base_model": "sd1", "text_encoder": "FrozenCLIPEmbedder:openai/clip-vit-large-patch14",
                                  "placeholder": "*", "superclass": "teddy", "c_inv_hash": "0" * 16,
                                  "beta": 0.7, "tau": 0.15, "training_steps": 400})
    size = os.path.getsize(path)
    print(f"\nSD1.5 concept file: {size} bytes ({size / 1024:.1f} KiB), payload {15_552 * 4} bytes")
    assert size <= 64 * 1024


@pytest.mark.parametrize("word", ["teddy bear", "<|endoftext|>"])
def test_an_initializer_that_is_not_one_word_of_ordinary_tokens_is_refused_with_the_word_named(tiny_world, word):
    config = tiny_world.perfusion_config(**{"model.params.personalization_config.params.initializer_words": [word]})
    with pytest.raises(PlaceholderError, match=f"initializer word '{word}' must be one word"):
        instantiate_from_config(config.model)


def test_sd2_structure_trains_and_its_concept_reloads(tiny_world_sd2, tmp_path):
    """OpenCLIP text encoder (pad 0, penultimate layer), linear proj_in/out, v-prediction."""
    world = tiny_world_sd2
    config = world.perfusion_config()
    model = instantiate_from_config(config.model)
    assert model.parameterization == "v" and type(model.cond_stage_model).__name__ == "FrozenOpenCLIPEmbedder"
    dataset = instantiate_from_config(OmegaConf.merge(config.data.params.train, {"params": {
        "placeholder_token": "*", "superclass": "teddy", "flip_p": 0.0}}))
    batch = default_collate([dataset[i] for i in range(2)])
    optimizer = model.configure_optimizers()
    embedding_before = model.embedding_manager.embeddings.detach().clone()
    for _ in range(2):
        loss, _ = model.shared_step(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(model.embedding_manager.embeddings, embedding_before)
    path = model.eval().save_concept_file(tmp_path / "teddy-sd2.safetensors")
    assert load_concept(path).metadata["base_model"] == "sd2"

    inference = instantiate_from_config(world.perfusion_config(**{
        "model.params.C_inv_path": None, "model.params.personalization_config.params.initializer_words": []}).model)
    inference.eval().load_concepts([path], beta=model.train_beta, tau=model.train_tau)
    model.apply_training_targets()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.apply_model(x, torch.tensor([300]), model.get_learned_conditioning(["a photo of a *"]))
        got = inference.apply_model(x, torch.tensor([300]), inference.get_learned_conditioning(["a photo of a *"]))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_target_input_update_without_a_trainer_has_momentum_0_99(trained):
    model = trained[0]
    saved = model.target_input.clone()
    try:
        model.target_input.zero_()
        model.update_target_input(torch.ones(3, model.target_input.numel()))
        torch.testing.assert_close(model.target_input, torch.full_like(saved, 0.01))
    finally:
        model.target_input.copy_(saved)


def test_lightning_updates_the_target_input_once_per_micro_batch_and_by_0_99_per_optimizer_step(tiny_world):
    """A real Lightning Trainer, 2 optimizer steps of 2 accumulated micro-batches: i* is updated after each
    micro-batch's encoding with momentum 0.99^(1/2), so it decays by 0.99 per optimizer step."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    config = tiny_world.perfusion_config()
    model = instantiate_from_config(config.model)
    dataset = instantiate_from_config(OmegaConf.merge(config.data.params.train, {"params": {
        "placeholder_token": "*", "superclass": "teddy", "flip_p": 0.0}}))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, accumulate_grad_batches=2, precision=32,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    calls = []  # (i* before, batch mean of the concept encodings, i* after, optimizer steps so far)
    update = model.update_target_input

    def recorded(concept_encodings):
        before = model.target_input.clone()
        update(concept_encodings)
        calls.append((before, concept_encodings.float().mean(0), model.target_input.clone(), trainer.global_step))

    model.update_target_input = recorded
    trainer.fit(model, DataLoader(dataset, batch_size=1))
    assert trainer.global_step == 2 and len(dataset) >= 4
    assert [step for *_, step in calls] == [0, 0, 1, 1]  # once per micro-batch, two per optimizer step
    m = 0.99 ** 0.5
    for before, mean, after, _ in calls:  # (the first batch also initialises i* to its mean, before updating it)
        torch.testing.assert_close(after, m * before + (1 - m) * mean, rtol=1e-6, atol=1e-7)
    assert all((after - before).abs().max() > 1e-6 for before, _, after, _ in calls[1:])


def test_gradient_checkpointing_as_in_the_real_configs_gives_the_same_losses_and_gradients(tiny_world):
    """The real configs train with ``use_checkpoint: True`` (the UNet's res- and transformer blocks recompute their
    activations in the backward pass): two optimizer steps give the losses, the gradients of the embedding and of
    the value outputs, and the concept of the same model with checkpointing off."""
    from ldm.modules.attention import BasicTransformerBlock
    from ldm.modules.diffusionmodules.openaimodel import ResBlock

    config = tiny_world.perfusion_config(**{"model.params.unet_config.params.use_checkpoint": True})
    model = instantiate_from_config(config.model)
    blocks = [m for m in model.model.diffusion_model.modules() if isinstance(m, (ResBlock, BasicTransformerBlock))]
    flags = [m for m in blocks if isinstance(m, BasicTransformerBlock)]
    assert len(flags) == 7 and len(blocks) > len(flags)
    assert all(m.checkpoint for m in flags) and all(m.use_checkpoint for m in blocks if isinstance(m, ResBlock))
    dataset = instantiate_from_config(OmegaConf.merge(config.data.params.train, {"params": {
        "placeholder_token": "*", "superclass": "teddy", "flip_p": 0.0}}))
    batch = default_collate([dataset[i] for i in range(2)])
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def train(checkpointing: bool, steps: int = 2):
        for m in blocks:
            setattr(m, "checkpoint" if isinstance(m, BasicTransformerBlock) else "use_checkpoint", checkpointing)
        model.load_state_dict(start)
        model.train()
        optimizer = model.configure_optimizers()
        calls = []  # cross-attention calls of the first transformer block: in the backward pass, recomputations
        hook = flags[0].attn2.register_forward_pre_hook(lambda *args: calls.append(1))
        losses, grads, recomputed = [], [], 0
        try:
            for step in range(steps):
                torch.manual_seed(step)
                loss, _ = model.shared_step(batch)
                optimizer.zero_grad()
                before_backward = len(calls)
                loss.backward()
                recomputed += len(calls) - before_backward
                losses.append(loss.detach())
                missing = [i for i, p in enumerate(model.trainable_parameters()) if p.grad is None]
                assert not missing, f"trainable tensors {missing} got no gradient (checkpointing={checkpointing})"
                grads.append([p.grad.detach().clone() for p in model.trainable_parameters()])
                optimizer.step()
        finally:
            hook.remove()
        return losses, grads, model.concept_state_vector(), recomputed

    losses, grads, concept, recomputed = train(True)
    assert recomputed == 2  # checkpointing is on: the block ran again in each backward pass
    plain_losses, plain_grads, plain_concept, recomputed = train(False)
    assert recomputed == 0
    print(f"\nlosses with checkpointing {[l.item() for l in losses]}, without {[l.item() for l in plain_losses]}")
    for a, b in zip(losses, plain_losses):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for step_grads, step_plain in zip(grads, plain_grads):
        assert all(g.abs().max() > 0 for g in step_plain)  # every trainable tensor gets a gradient
        for g, h in zip(step_grads, step_plain):
            torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(concept, plain_concept, rtol=1e-4, atol=1e-6)


def test_multi_token_superclass_starts_from_the_mean_and_locks_keys_at_its_last_sub_token(tiny_world):
    """A super-class of several tokens ('birdbath' -> 'bird' 'bath'): the placeholder embedding starts at the mean of
    the sub-token embeddings, and i_super (hence o*_K = W_K i_super) is the super-class caption's encoding at the
    last sub-token, which the causal encoder lets see the whole word; the concept trains one step."""
    config = tiny_world.perfusion_config(**{
        "model.params.personalization_config.params.initializer_words": ["birdbath"]})
    model = instantiate_from_config(config.model)
    encoder = model.cond_stage_model
    sub_tokens = encoder.tokenize(["birdbath"])[0, 1:3].tolist()
    assert [encoder.tokenizer.convert_ids_to_tokens(t) for t in sub_tokens] == ["bird", "bath</w>"]
    assert model.embedding_manager.superclass_token_counts == [2]
    table = encoder.token_embedding.weight
    torch.testing.assert_close(model.embedding_manager.embeddings[0], table[sub_tokens].float().mean(0))

    dataset = instantiate_from_config(OmegaConf.merge(config.data.params.train, {"params": {
        "placeholder_token": "*", "superclass": "birdbath", "flip_p": 0.0, "templates": ["a photo of a {}"]}}))
    batch = default_collate([dataset[i] for i in range(2)])
    assert batch["caption_superclass"][0] == "a photo of a birdbath"
    loss, _ = model.shared_step(batch)
    loss.backward()
    superclass_tokens = encoder.tokenize(["a photo of a birdbath"])
    assert superclass_tokens[0, 5:7].tolist() == sub_tokens            # '*' stands at 5 in "a photo of a *"
    with torch.no_grad():
        encoded = encoder.encode_tokens(superclass_tokens)[0]
    torch.testing.assert_close(model.superclass_input, encoded[6].float(), rtol=0, atol=1e-5)
    assert (model.superclass_input - encoded[5].float()).abs().max() > 1e-3  # not the first sub-token
    key = next(iter(edited_layers(model.model.diffusion_model, "key").values()))
    torch.testing.assert_close(key.target_output[0], key.weight.float() @ encoded[6].float(), rtol=0, atol=1e-5)
    assert model.embedding_manager.embeddings.grad is not None


def test_multi_token_placeholder_stays_an_error(tiny_world):
    config = tiny_world.perfusion_config(**{
        "model.params.personalization_config.params.placeholder_strings": ["birdbath"]})
    with pytest.raises(PlaceholderError, match="placeholder 'birdbath' is 2 tokens"):
        instantiate_from_config(config.model)


def test_cached_latents_give_the_same_loss_and_encode_each_crop_once(tiny_world):
    config = tiny_world.perfusion_config()
    model = instantiate_from_config(config.model).train()
    dataset = instantiate_from_config(OmegaConf.merge(config.data.params.train, {"params": {
        "placeholder_token": "*", "superclass": "teddy", "flip_p": 0.0}}))
    batch = default_collate([dataset[i] for i in range(2)])
    assert all(batch["latent_key"]) and len(set(batch["latent_key"])) == 2
    encoder_calls = []
    model.first_stage_model.encoder.register_forward_hook(lambda m, i, o: encoder_calls.append(i[0].shape[0]))

    state = {k: v.clone() for k, v in model.state_dict().items()}

    def loss(cache: bool) -> torch.Tensor:
        model.load_state_dict(state)  # each step moves i*: start every call from the same state
        model.cache_latents = cache
        torch.manual_seed(3)
        with torch.no_grad():
            return model.shared_step(batch)[0]

    uncached = loss(False)
    first, second = loss(True), loss(True)
    assert uncached.item() > 0 and torch.equal(first, uncached) and torch.equal(second, uncached)
    # uncached: 2 rows; the cache's first call encodes both rows, its second encodes nothing
    assert encoder_calls == [2, 2]
    assert sorted(model.latent_cache) == sorted(batch["latent_key"])
    # a batch with one new crop encodes that row only; a random crop (empty key) bypasses the cache
    flipped = dict(batch, latent_key=[batch["latent_key"][0], batch["latent_key"][1] + "+other"])
    torch.manual_seed(3)
    with torch.no_grad():
        model.shared_step(flipped)
    assert encoder_calls == [2, 2, 1]
    random_crops = instantiate_from_config(OmegaConf.merge(config.data.params.train, {"params": {
        "placeholder_token": "*", "superclass": "teddy", "center_crop": False}}))
    assert random_crops[0]["latent_key"] == ""
