"""Generation: the seed's command line on a tiny model, samplers, per-prompt work, global locking, several concepts."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import default_collate

from ldm.util import instantiate_from_config
from perfusion.concept_file import load_concept, save_concept
from perfusion.roe import concept_gate, edited_layers, energy, similarity
from scripts.perfusion_txt2img import distinct_placeholders, fill_prompt

REPO = Path(__file__).resolve().parent.parent
INFERENCE_CONFIG = "configs/tiny/perfusion-inference-sd1-tiny.yaml"
TEMPLATES = ["a photo of a {}", "a painting of the {}"]


def _train_concept(tiny_world, path, superclass, data_seed, template, steps=3):
    from tests._tiny_concept import write_toy_concept_images

    torch.manual_seed(data_seed)  # noise and timesteps of the training steps, whatever ran before
    data_root = tiny_world.root / f"data-{superclass}"
    write_toy_concept_images(data_root, n=2, size=32, seed=data_seed)
    config = tiny_world.perfusion_config(**{
        "model.params.personalization_config.params.initializer_words": [superclass]})
    model = instantiate_from_config(config.model)
    # One caption template per concept, so i* is the encoding of that template's concept token: the tiny random
    # text encoder, unlike CLIP, encodes a token mostly by its context, so two concepts need different contexts
    # to be told apart.
    dataset = instantiate_from_config(OmegaConf.merge(config.data.params.train, {"params": {
        "data_root": str(data_root), "placeholder_token": "*", "superclass": superclass,
        "templates": [template]}}))
    batch = default_collate([dataset[i] for i in range(2)])
    optimizer = model.configure_optimizers()
    for _ in range(steps):
        loss, _ = model.shared_step(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.save_concept_file(path)


@pytest.fixture(scope="module")
def concepts(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("concepts")
    return (_train_concept(tiny_world, root / "teddy.safetensors", "teddy", 1, TEMPLATES[0]),
            _train_concept(tiny_world, root / "cat.safetensors", "cat", 2, TEMPLATES[1]))


@pytest.fixture(scope="module")
def inference_model(tiny_world):
    config = OmegaConf.load(INFERENCE_CONFIG)
    model = instantiate_from_config(config.model)
    model.init_from_ckpt(str(tiny_world.ckpt))
    return model.eval()


def run_txt2img(args, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "scripts/perfusion_txt2img.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def script_pixels(model, text, n_samples, steps, scale, seed=42, shape=(4, 8, 8), negative=""):
    """What scripts/perfusion_txt2img.py makes of ``text`` with DDIM (eta 0) on ``model`` as loaded: its start noise
    (one torch.Generator seeded with --seed, randn of (n_samples, C, H/f, W/f)), its sampling call and its decoding,
    as float pixels in [0, 255] before the PNG's rounding, (n, H, W, 3)."""
    from sgm.sampling import sample

    x_T = torch.randn((n_samples, *shape), generator=torch.Generator(device="cpu").manual_seed(seed))
    c = model.get_learned_conditioning([text] * n_samples)
    uc = model.get_learned_conditioning([negative] * n_samples)
    latents = sample(model, c, x_T, uc, steps=steps, scale=scale)
    decoded = model.decode_first_stage(latents).float().clamp(-1, 1)
    return ((decoded + 1) * 127.5).permute(0, 2, 3, 1).numpy()


def png_pixels(folder):
    return np.stack([np.asarray(Image.open(p)).astype(np.float64) for p in sorted(Path(folder).glob("*.png"))])


def seed_command(concept, ckpt, outdir, *extra):
    return ["--ddim_eta", "0.0", "--steps", "4", "--scale", "6.0", "--beta", "0.7", "--tau", "0.15",
            "--n_samples", "2", "--n_iter", "1", "--personalized_ckpt", str(concept), "--prompt", "photo of a {}",
            "--config", INFERENCE_CONFIG, "--ckpt", str(ckpt), "--H", "32", "--W", "32", "--f", "4", "--outdir", str(outdir),
            *extra]


def test_seed_command_line_runs_end_to_end_and_is_reproducible(concepts, tiny_world, tmp_path):
    first = run_txt2img(seed_command(concepts[0], tiny_world.ckpt, tmp_path / "a"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_txt2img(seed_command(concepts[0], tiny_world.ckpt, tmp_path / "b"))
    assert second.returncode == 0, second.stderr[-3000:]
    files = sorted((tmp_path / "a" / "samples").glob("*.png"))
    assert [f.name for f in files] == ["00000.png", "00001.png"]
    assert (tmp_path / "a" / "grid-0000.png").is_file()
    image = Image.open(files[0])
    assert image.size == (32, 32)
    meta = image.text
    assert meta["prompt"] == "photo of a {}" and meta["text"] == "photo of a *"
    assert meta["seed"] == "42" and meta["sampler"] == "DDIMSampler" and meta["steps"] == "4"
    assert meta["scale"] == "6.0" and meta["beta"] == "0.7" and meta["tau"] == "0.15"
    assert meta["concepts"] == str(concepts[0])
    for a, b in zip(files, sorted((tmp_path / "b" / "samples").glob("*.png"))):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    pixels = np.asarray(image).astype(float)
    assert pixels.std() > 1.0  # not a blank image


@pytest.mark.parametrize("extra", [["--plms"], ["--advanced_sampler"], ["--ddim_eta", "1.0", "--scale", "1.0"]])
def test_other_samplers_write_finite_images_of_the_right_size(concepts, tiny_world, tmp_path, extra):
    args = seed_command(concepts[0], tiny_world.ckpt, tmp_path)
    args = [a for a in args if a not in ("--ddim_eta", "0.0")] + extra if "--ddim_eta" in extra else args + extra
    result = run_txt2img(args)
    assert result.returncode == 0, result.stderr[-3000:]
    images = sorted((tmp_path / "samples").glob("*.png"))
    assert len(images) == 2 and all(Image.open(p).size == (32, 32) for p in images)
    assert np.asarray(Image.open(images[0])).std() > 1.0


def _sample(model, sampler_kind, steps, x_T, c, uc, scale=3.0):
    from sgm.sampling import build_sampler_and_denoiser, sample, schedule_of

    if sampler_kind == "ddim":
        return sample(model, c, x_T, uc, steps=steps, scale=scale)
    sampler, denoiser = build_sampler_and_denoiser("configs/sampler/sampler.yaml", "configs/denoiser/denoiser.yaml",
                                                   parameterization=model.parameterization, num_steps=steps,
                                                   guidance_scale=scale, verbose=False,
                                                   alphas_cumprod=schedule_of(model))
    return sample(model, c, x_T, uc, sampler=sampler, denoiser=denoiser)


def _concept_inputs(model, concept):
    """The model with one concept loaded, and (cond, uncond, start noise) for two samples."""
    model.load_concepts([concept])
    c = model.get_learned_conditioning(["a photo of a *"] * 2)
    uc = model.get_learned_conditioning([""] * 2)
    return c, uc, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_edm_euler_with_many_steps_approaches_ddim(inference_model, concepts):
    model = inference_model
    c, uc, x_T = _concept_inputs(model, concepts[0])
    ddim = _sample(model, "ddim", 100, x_T, c, uc)
    euler = _sample(model, "euler", 100, x_T, c, uc)
    few_steps = _sample(model, "euler", 5, x_T, c, uc)
    relative = ((euler - ddim).norm() / ddim.norm()).item()
    coarse = ((few_steps - ddim).norm() / ddim.norm()).item()
    print(f"\nEDM Euler vs DDIM (100 steps): relative difference {relative:.4f} (Euler 5 steps: {coarse:.4f})")
    # Both integrate the same probability-flow ODE; they start from slightly different noise levels (DDIM's
    # first step is t=991 here, the EDM discretization's 999), so the gap does not vanish, but stays small.
    assert relative < 0.1 and relative < coarse / 2


@torch.no_grad()
def test_per_prompt_work_is_done_once_per_edit_state_and_equals_the_equations(inference_model, concepts):
    """No output cache: each edited layer folds the projection into its weight once per EditState change, and the
    samples equal those of layers that apply the method's equations directly at every call."""
    import perfusion.roe as roe

    model = inference_model
    c, uc, x_T = _concept_inputs(model, concepts[0])
    layers = edited_layers(model.model.diffusion_model)
    folds = []
    original_projection = roe.project_onto_targets
    roe.project_onto_targets = lambda *a: (folds.append(1), original_projection(*a))[1]
    try:
        folded = _sample(model, "ddim", 6, x_T, c, uc)
        assert len(folds) == len(layers)                   # once per layer for all 6 steps, cond and uncond
        model.edit_state.set_gating(0.7, 0.15)             # a new state: the layers fold again, once
        _sample(model, "ddim", 2, x_T, c, uc)
        assert len(folds) == 2 * len(layers)
    finally:
        roe.project_onto_targets = original_projection

    def by_the_equations(layer, e):
        state = layer.state
        targets, c_inv_targets = state.target_inputs.float(), state.c_inv_target_inputs.float()
        gate = concept_gate(similarity(e, c_inv_targets), energy(targets, c_inv_targets), state.beta.float(),
                            state.tau.float())
        e_perp = e - original_projection(e, targets, c_inv_targets)
        return torch.nn.functional.linear(e_perp, layer.weight) + gate @ layer.target_output

    forwards = {name: layer.forward for name, layer in layers.items()}
    for layer in layers.values():
        layer.forward = lambda e, layer=layer: by_the_equations(layer, e)
    try:
        direct = _sample(model, "ddim", 6, x_T, c, uc)
    finally:
        for name, layer in layers.items():
            layer.forward = forwards[name]
    assert (folded - direct).abs().max() <= 1e-4 * direct.abs().max()
    assert not any(vars(layer).get("_cache") for layer in layers.values())


@torch.no_grad()
def test_global_locking_feeds_keys_the_superclass_prompt_and_values_the_concept_prompt(inference_model, concepts):
    model = inference_model
    model.load_concepts([concepts[0]], beta=0.5, tau=0.15)
    concept_prompt = model.get_learned_conditioning(["a photo of a *"])
    superclass_prompt = model.cond_stage_model.encode(["a photo of a teddy"])
    key_name, key_layer = next(iter(edited_layers(model.model.diffusion_model, "key").items()))
    value_layer = edited_layers(model.model.diffusion_model, "value")[key_name.replace("to_k", "to_v")]
    local_keys, local_values = key_layer(concept_prompt), value_layer(concept_prompt)
    unconditional = model.get_learned_conditioning([""])
    model.set_global_locking(["a photo of a *"], ["a photo of a teddy"])
    batch = torch.cat([unconditional, concept_prompt])                # guidance's [uncond; cond] layout
    global_keys, global_values = key_layer(batch), value_layer(batch)
    model.set_global_locking(None)
    torch.testing.assert_close(global_keys[1:], superclass_prompt @ key_layer.weight.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(global_keys[:1], unconditional @ key_layer.weight.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(global_values[1:], local_values, rtol=0, atol=1e-5)
    assert (global_keys[1:] - local_keys).abs().max() > 1e-4
    assert (key_layer(concept_prompt) - local_keys).abs().max() == 0  # back to local locking
    model.set_global_locking(["a photo of a *"], ["a photo of a teddy"])
    with pytest.raises(ValueError, match="none of the prompts"):
        key_layer(model.get_learned_conditioning(["a red car"]))
    model.set_global_locking(None)


def test_global_locking_command_line(concepts, tiny_world, tmp_path):
    result = run_txt2img(seed_command(concepts[0], tiny_world.ckpt, tmp_path / "g", "--global_locking"))
    assert result.returncode == 0, result.stderr[-3000:]
    local = run_txt2img(seed_command(concepts[0], tiny_world.ckpt, tmp_path / "l"))
    assert local.returncode == 0, local.stderr[-3000:]
    a = np.asarray(Image.open(tmp_path / "g" / "samples" / "00000.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "l" / "samples" / "00000.png")).astype(int)
    assert Image.open(tmp_path / "g" / "samples" / "00000.png").text["global_locking"] == "True"
    assert np.abs(a - b).max() > 0  # keys from the super-class prompt change the image


@torch.no_grad()
def test_two_concepts_each_placeholder_activates_its_own_gate(inference_model, concepts):
    """With both concepts loaded, concept k's gate is near 1 at its own placeholder and near 0 at the words before
    it, and the other concept's gate is near 0 at every token of the prompt.

    Each prompt is its concept's training template: the tiny random text encoder, unlike CLIP, encodes a token
    mostly by its context (its own token moves the encoding less), so only there does the placeholder's encoding
    stand out. A sharp gate (small tau, beta between the placeholder's normalised similarity, about 0.85-1.15 here,
    and the other words', at most about 0.57) tells "open" from "closed" with a margin: the concepts' values vary
    with the machine and the thread count, since Adam's first steps amplify rounding in tiny gradients. Different
    beta and tau per concept check that each concept gets its own."""
    model = inference_model
    loaded = [load_concept(p) for p in concepts]
    placeholders = distinct_placeholders(loaded)
    assert placeholders == ["*", "&"]  # both files use '*': the second is renamed
    model.load_concepts(list(concepts), beta=[0.7, 0.72], tau=[0.03, 0.025], placeholders=placeholders)
    state = model.edit_state
    assert state.beta.tolist() == pytest.approx([0.7, 0.72]) and state.tau.tolist() == pytest.approx([0.03, 0.025])
    for k in range(2):  # the concept files' statistics, in the order of the placeholders
        torch.testing.assert_close(state.target_inputs[k], loaded[k].target_input.to(state.target_inputs), rtol=0,
                                   atol=0)
    ids = model.embedding_manager.placeholder_token_ids.tolist()
    end_token = int(model.tokenize([""])[0][1])
    for k in range(2):
        prompt = fill_prompt(TEMPLATES[k].replace("{}", f"{{{k + 1}}}"), placeholders)
        tokens = model.tokenize([prompt])[0]
        encoding = model.get_learned_conditioning([prompt])[0]
        gates = concept_gate(similarity(encoding, state.c_inv_target_inputs),
                             energy(state.target_inputs, state.c_inv_target_inputs), state.beta, state.tau)
        position = int((tokens == ids[k]).nonzero()[0])
        end = int((tokens == end_token).nonzero()[0])
        assert end == position + 1 and not (tokens[:end] == ids[1 - k]).any()
        print(f"\n'{prompt}': gates at the placeholder {gates[position].tolist()}, before it max "
              f"{gates[:position].max(dim=0).values.tolist()}, at the end token {gates[end].tolist()}")
        assert gates[position, k] > 0.9                    # open at its own placeholder
        assert (gates[:position, k] < 0.1).all()           # closed at the start token and the words before it
        assert gates[end, k] < 0.5                         # the end token sees the placeholder, but stays closer to 0
        assert (gates[:end + 1, 1 - k] < 0.1).all()        # the other concept: closed everywhere
    # The placeholder's own embedding opens the gate, not only its context: concept 2's placeholder in concept 1's
    # template leaves concept 1's gate closed. (Not the other way round on this encoder: in the context 'a painting
    # of the', concept 1's placeholder opens concept 2's gate too.)
    prompt = TEMPLATES[0].format(placeholders[1])
    tokens, encoding = model.tokenize([prompt])[0], model.get_learned_conditioning([prompt])[0]
    gates = concept_gate(similarity(encoding, state.c_inv_target_inputs),
                         energy(state.target_inputs, state.c_inv_target_inputs), state.beta, state.tau)
    assert gates[int((tokens == ids[1]).nonzero()[0]), 0] < 0.1


@torch.no_grad()
def test_one_concept_through_the_numbered_prompt_equals_the_single_form(concepts, tiny_world, tmp_path):
    args = seed_command(concepts[0], tiny_world.ckpt, tmp_path / "single")
    numbered = [a if a != "photo of a {}" else "photo of a {1}" for a in seed_command(concepts[0], tiny_world.ckpt,
                                                                                         tmp_path / "numbered")]
    assert run_txt2img(args).returncode == 0 and run_txt2img(numbered).returncode == 0
    a = np.asarray(Image.open(tmp_path / "single" / "samples" / "00000.png"))
    b = np.asarray(Image.open(tmp_path / "numbered" / "samples" / "00000.png"))
    assert np.array_equal(a, b)


@torch.no_grad()
def test_two_concepts_on_the_command_line(concepts, tiny_world, inference_model, tmp_path):
    """The image with both concepts is the model's own sample with both loaded (each its own beta), and each
    concept changes it: it differs from the image of either concept alone, for the same text."""
    args = seed_command(f"{concepts[0]},{concepts[1]}", tiny_world.ckpt, tmp_path)
    args[args.index("photo of a {}")] = "photo of a {1} and a {2}"
    args[args.index("--beta") + 1] = "0.6,0.65"
    result = run_txt2img(args)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = Image.open(tmp_path / "samples" / "00000.png").text
    assert meta["text"] == "photo of a * and a &" and meta["beta"] == "0.6,0.65"
    images = png_pixels(tmp_path / "samples")
    assert images.shape == (2, 32, 32, 3)

    model, text = inference_model, "photo of a * and a &"
    model.load_concepts(list(concepts), beta=[0.6, 0.65], tau=0.15, placeholders=["*", "&"])
    both = script_pixels(model, text, 2, steps=4, scale=6.0)
    assert np.abs(images - both).max() <= 1.0  # PNG rounding
    alone = []
    for k, (placeholder, beta) in enumerate([("*", 0.6), ("&", 0.65)]):
        model.load_concepts([concepts[k]], beta=beta, tau=0.15, placeholders=[placeholder])
        alone.append(np.round(script_pixels(model, text, 2, steps=4, scale=6.0)))
        # with one concept, the other's placeholder is an ordinary token of the text encoder's vocabulary
    differences = [float(np.abs(images - a).mean()) for a in alone]
    print(f"\nmean |two concepts - concept k alone| (gray levels): {differences}; "
          f"|concept 1 alone - concept 2 alone|: {float(np.abs(alone[0] - alone[1]).mean()):.2f}")
    assert all(d > 1.0 for d in differences)     # each concept changes the two-concept image
    assert float(np.abs(alone[0] - alone[1]).mean()) > 1.0


def _bad(args, tiny_world, tmp_path, concept):
    base = seed_command(concept, tiny_world.ckpt, tmp_path)
    for key, value in args.items():
        if key in base:
            base[base.index(key) + 1] = value
        else:
            base += [key, value]
    return run_txt2img(base, timeout=120)


@pytest.mark.parametrize("change, message", [
    ({"--prompt": "photo of {1} and {2}"}, "refers to concept {2} but only 1"),
    ({"--beta": "0.6,0.7"}, "--beta has 2 values but 1 concept"),
    ({"--tau": "0.1,0.2,0.3"}, "--tau has 3 values"),
    ({"--personalized_ckpt": "missing.safetensors"}, "concept file not found: missing.safetensors"),
    ({"--ckpt": "ckpt/nothere.ckpt"}, "--ckpt ckpt/nothere.ckpt: file not found"),
])
def test_bad_input_gives_one_clear_error_before_loading_the_model(change, message, concepts, tiny_world, tmp_path):
    result = _bad(change, tiny_world, tmp_path, concepts[0])
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and "DDIMSampler" not in result.stderr


def test_concept_of_another_base_family_is_refused(concepts, tiny_world, tmp_path):
    concept = load_concept(concepts[0])
    sd2 = save_concept(tmp_path / "sd2.safetensors", value_outputs=concept.value_outputs, embedding=concept.embedding,
                       target_input=concept.target_input, c_inv_target_input=concept.c_inv_target_input,
                       superclass_input=concept.superclass_input, metadata=dict(concept.metadata, base_model="sd2"))
    result = _bad({}, tiny_world, tmp_path, sd2)
    assert result.returncode == 2 and "trained on base model 'sd2'" in result.stderr
    assert "perfusion_inference_sd_v2.yaml" in result.stderr


@torch.no_grad()
def test_without_a_concept_the_plain_base_model_is_sampled(tiny_world, tmp_path):
    """Without --personalized_ckpt the images are the plain base model's: the LatentDiffusion of the base config
    and checkpoint, sampled in process from the script's seed noise, gives the same pixels (to PNG rounding)."""
    from ldm.models.diffusion.ddpm import LatentDiffusion

    result = run_txt2img(["--steps", "3", "--n_samples", "2", "--prompt", "a photo of a teddy", "--config",
                          INFERENCE_CONFIG, "--ckpt", str(tiny_world.ckpt), "--H", "32", "--W", "32", "--f", "4",
                          "--outdir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    image = Image.open(tmp_path / "samples" / "00000.png")
    assert image.size == (32, 32) and image.text["concepts"] == "" and image.text["beta"] == ""
    assert image.text["seed"] == "42" and image.text["scale"] == "6.0" and image.text["steps"] == "3"
    base = instantiate_from_config(OmegaConf.load(tiny_world.base_config).model)
    assert type(base) is LatentDiffusion
    base.init_from_ckpt(str(tiny_world.ckpt))
    expected = script_pixels(base.eval(), "a photo of a teddy", 2, steps=3, scale=6.0)
    images = png_pixels(tmp_path / "samples")
    assert images.shape == expected.shape == (2, 32, 32, 3)
    assert np.abs(images - expected).max() <= 1.0  # PNG rounding
    assert np.abs(images[0] - images[1]).mean() > 1.0  # two samples of two noises
    # another seed's noise gives another image: the comparison above depends on reproducing the script's noise
    other = script_pixels(base, "a photo of a teddy", 2, steps=3, scale=6.0, seed=43)
    assert np.abs(images - other).mean() > 1.0


def test_negative_prompt_replaces_the_empty_prompt_of_guidance(tiny_world, tmp_path):
    """--negative_prompt is the unconditional side of guidance: the images equal the base model sampled in process
    with that prompt as uncond, differ from the run without it, and the PNG records it."""
    base_args = ["--steps", "3", "--n_samples", "2", "--prompt", "a photo of a teddy", "--config", INFERENCE_CONFIG,
                 "--ckpt", str(tiny_world.ckpt), "--H", "32", "--W", "32", "--f", "4"]
    result = run_txt2img(base_args + ["--negative_prompt", "a red car", "--outdir", str(tmp_path / "neg")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(tmp_path / "neg" / "samples" / "00000.png").text["negative_prompt"] == "a red car"
    base = instantiate_from_config(OmegaConf.load(tiny_world.base_config).model)
    base.init_from_ckpt(str(tiny_world.ckpt))
    expected = script_pixels(base.eval(), "a photo of a teddy", 2, steps=3, scale=6.0, negative="a red car")
    images = png_pixels(tmp_path / "neg" / "samples")
    assert np.abs(images - expected).max() <= 1.0
    plain = script_pixels(base, "a photo of a teddy", 2, steps=3, scale=6.0)
    assert np.abs(images - plain).mean() > 1.0  # the negative prompt changed the guidance


@pytest.mark.parametrize("extra, message", [
    (["--negative_prompt", "blurry", "--scale", "1.0"], "scale 1"),
    (["--negative_prompt", "a blurry {}"], "refers to concept"),
])
def test_negative_prompt_errors(tiny_world, tmp_path, extra, message):
    result = run_txt2img(["--steps", "2", "--n_samples", "1", "--prompt", "a photo of a teddy", "--config",
                          INFERENCE_CONFIG, "--ckpt", str(tiny_world.ckpt), "--outdir", str(tmp_path), *extra])
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "samples").exists()
