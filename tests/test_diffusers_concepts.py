"""perfusion.diffusers: concept files in a diffusers StableDiffusionPipeline give the images of
scripts/perfusion_txt2img.py (its code path in-process: load_and_check_concepts, distinct_placeholders, fill_prompt,
Perfusion.load_concepts, make_sampler's DDIM and sgm.sampling.sample), with one and two concepts, SD1 (eps) and
SD2 (v-prediction), local and global locking; remove_concepts restores the base pipeline exactly."""
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

from argparse import Namespace

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import BadValueError, load_model_from_config
from perfusion.concept_file import SELECTED_BY_KEY, load_concept, save_concept, update_concept_metadata
from perfusion.diffusers import applied_concepts, apply_concepts, original_layer_name, remove_concepts
from perfusion.perfusion import base_model_family, text_encoder_name
from perfusion.roe import edited_layers, inference_gating
from scripts.perfusion_txt2img import distinct_placeholders, fill_prompt, load_and_check_concepts, make_sampler
from tests._tiny_models import write_tiny_checkpoint
from tests._tiny_pipelines import tiny_pipeline

TOL = 1e-4                      # images in [0, 1], as diffusers' output_type="pt" gives them
STEPS, SCALE, N, SEED = 3, 6.0, 2, 42
ONE = "a photo of a {} on the beach"
TWO = "a photo of a {1} next to a {2}"
INFERENCE_CONFIGS = {family: f"configs/tiny/perfusion-inference-{family}-tiny.yaml" for family in ("sd1", "sd2")}


def _encoding_at(model, text, placeholder):
    """The text encoder's output at ``placeholder``'s position in ``text`` (embeddings of the loaded concepts)."""
    tokens = model.tokenize([text])
    position = int((tokens[0] == model.embedding_manager.placeholder_token_ids[
        model.embedding_manager.placeholder_strings.index(placeholder)]).nonzero()[0])
    return model.get_learned_conditioning([text])[0, position]


@torch.no_grad()
def _write_concepts(model, folder, family):
    """Two concept files for ``model`` (placeholder '*' each, super-classes 'teddy' and 'cat'): random word
    embeddings and value targets, a random SPD C^-1, and i* the encoding of each placeholder in the two-concept
    prompt, so that every gate opens at its concept's token and the concepts change the image."""
    g = torch.Generator().manual_seed(5)
    encoder = model.cond_stage_model
    table = encoder.token_embedding.weight
    dim = table.shape[1]
    words = table[torch.randint(0, 49000, (2,), generator=g)]
    embeddings = words + 0.5 * table.std() * torch.randn(2, dim, generator=g)
    model.embedding_manager.set_embeddings(embeddings, ["*", "&"], encoder)
    text = fill_prompt(TWO, ["*", "&"])
    targets = [_encoding_at(model, text, p) for p in ("*", "&")]
    m = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    c_inv = torch.linalg.inv(m @ m.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64))
    paths = []
    for k, superclass in enumerate(("teddy", "cat")):
        super_text = f"a photo of a {superclass}"
        superclass_input = encoder.encode([super_text])[0, len(encoder.text_tokens(super_text))]
        values = {}
        for name, layer in edited_layers(model.model.diffusion_model, "value").items():
            plain = superclass_input @ layer.weight.T
            values[name] = plain + 2 * plain.std() * torch.randn(plain.shape, generator=g)
        paths.append(save_concept(
            folder / f"{superclass}-{family}.safetensors", value_outputs=values, embedding=embeddings[k],
            target_input=targets[k], c_inv_target_input=(c_inv @ targets[k].double()).float(),
            superclass_input=superclass_input,
            metadata={"base_model": base_model_family(encoder), "text_encoder": text_encoder_name(encoder),
                      "placeholder": "*", "superclass": superclass, "c_inv_hash": f"tiny-{family}"}))
    return paths


class Family:
    def __init__(self, family, root):
        self.family = family
        self.ckpt = root / f"tiny-{family}.safetensors"
        write_tiny_checkpoint(self.ckpt, family, seed=13)
        self.config = OmegaConf.load(INFERENCE_CONFIGS[family])
        self.model = load_model_from_config(self.config, self.ckpt)
        self.concepts = _write_concepts(self.model, root, family)
        self.pipe = tiny_pipeline(family, self.ckpt)
        self.noise = torch.randn((N, 4, 8, 8), generator=torch.Generator().manual_seed(SEED))

    @torch.no_grad()
    def script_images(self, paths, prompt, beta=None, tau=None, global_locking=False):
        """What perfusion_txt2img.py computes for ``prompt`` with these concept files (DDIM, eta 0), before the
        PNG's rounding, as (N, 3, H, W) in [0, 1]."""
        from sgm.sampling import sample

        model = self.model
        concepts = load_and_check_concepts([str(p) for p in paths], self.config)
        default_beta, default_tau = inference_gating(len(concepts))
        placeholders = distinct_placeholders(concepts)
        model.load_concepts(concepts, beta=default_beta if beta is None else beta,
                            tau=default_tau if tau is None else tau, placeholders=placeholders)
        text = fill_prompt(prompt, placeholders)
        c = model.get_learned_conditioning([text] * N)
        uc = model.get_learned_conditioning([""] * N)
        if global_locking:
            superclasses = [c.metadata["superclass"] for c in concepts]
            model.set_global_locking([text], [fill_prompt(prompt, superclasses)])
        opt = Namespace(advanced_sampler=False, plms=False, steps=STEPS, scale=SCALE, ddim_eta=0.0)
        sampler, denoiser, _ = make_sampler(opt, model)
        samples = sample(model, c, self.noise.clone(), uc, sampler=sampler, denoiser=denoiser)
        model.set_global_locking(None)
        return (model.decode_first_stage(samples).float().clamp(-1, 1) + 1) / 2

    @torch.no_grad()
    def pipeline_images(self, prompt):
        return self.pipe([prompt] * N, num_inference_steps=STEPS, guidance_scale=SCALE, eta=0.0,
                         latents=self.noise.clone(), output_type="pt").images


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def world(request, tmp_path_factory):
    world = Family(request.param, tmp_path_factory.mktemp(f"diffusers-{request.param}"))
    yield world
    remove_concepts(world.pipe)


def _max_diff(a, b):
    return (a - b).abs().max().item()


# ----- names ---------------------------------------------------------------------------------------------------------
def test_original_layer_names_follow_diffusers_rule_for_sd_unets():
    """SD 1.x/2.x (2 ResNets per level, attention at the first three levels) and a layout with 1 ResNet per level."""
    rest = "transformer_blocks.0.attn2.to_v"
    expected = {"down_blocks.0.attentions.0": "input_blocks.1.1", "down_blocks.0.attentions.1": "input_blocks.2.1",
                "down_blocks.1.attentions.0": "input_blocks.4.1", "down_blocks.2.attentions.1": "input_blocks.8.1",
                "mid_block.attentions.0": "middle_block.1",
                "up_blocks.1.attentions.0": "output_blocks.3.1", "up_blocks.1.attentions.2": "output_blocks.5.1",
                "up_blocks.3.attentions.2": "output_blocks.11.1"}
    for ours_name, original in expected.items():
        assert original_layer_name(f"{ours_name}.{rest}", 2) == f"{original}.{rest}"
    assert original_layer_name(f"down_blocks.1.attentions.0.{rest}", 1) == f"input_blocks.3.1.{rest}"
    assert original_layer_name(f"up_blocks.2.attentions.1.{rest}", 1) == f"output_blocks.5.1.{rest}"
    with pytest.raises(ValueError, match="not inside a transformer"):
        original_layer_name("down_blocks.0.resnets.0.conv1", 2)


def test_every_diffusers_cross_attention_maps_to_our_layer_with_the_same_weights(world):
    ours = {n.removesuffix(".to_k"): layer for n, layer in edited_layers(world.model.model.diffusion_model,
                                                                          "key").items()}
    unet = world.pipe.unet
    mapped = {original_layer_name(n, unet.config.layers_per_block): m for n, m in unet.named_modules()
              if n.endswith(".attn2")}
    assert set(mapped) == set(ours) and len(mapped) == 7
    for name, attention in mapped.items():
        assert torch.equal(attention.to_k.weight, ours[name].weight)


# ----- images --------------------------------------------------------------------------------------------------------
def test_one_concept_gives_the_images_of_perfusion_txt2img(world):
    base = world.pipeline_images(fill_prompt(ONE, ["teddy"]))
    tokens = apply_concepts(world.pipe, [world.concepts[0]])
    assert tokens == [f"<teddy-{world.family}>"] and applied_concepts(world.pipe) == tokens
    got = world.pipeline_images(fill_prompt(ONE, tokens))
    expected = world.script_images(world.concepts[:1], ONE)
    print(f"\n{world.family} one concept: max |pipeline - txt2img| = {_max_diff(got, expected):.2e}")
    assert _max_diff(got, expected) <= TOL
    assert _max_diff(got, base) > 1e-2 and got.std() > 0.05   # the concept changes the image


def test_two_concepts_give_the_images_of_perfusion_txt2img(world):
    tokens = apply_concepts(world.pipe, world.concepts, tokens=["<bear>", "<kitty>"])
    assert tokens == ["<bear>", "<kitty>"]
    got = world.pipeline_images(fill_prompt(TWO, tokens))
    expected = world.script_images(world.concepts, TWO)
    print(f"\n{world.family} two concepts: max |pipeline - txt2img| = {_max_diff(got, expected):.2e}")
    assert _max_diff(got, expected) <= TOL
    state = world.pipe._perfusion_concepts.state
    assert state.beta.tolist() == [inference_gating(2)[0]] * 2 and state.num_concepts == 2
    # per-concept beta and tau, as --beta 0.5,0.65 --tau 0.1,0.2
    apply_concepts(world.pipe, world.concepts, beta=[0.5, 0.65], tau=[0.1, 0.2])
    got = world.pipeline_images(fill_prompt(TWO, applied_concepts(world.pipe)))
    expected_gating = world.script_images(world.concepts, TWO, beta=[0.5, 0.65], tau=[0.1, 0.2])
    assert _max_diff(got, expected_gating) <= TOL and _max_diff(expected_gating, expected) > 1e-3


def test_global_locking_gives_the_images_of_perfusion_txt2img(world):
    tokens = apply_concepts(world.pipe, world.concepts[:1], global_locking=True)
    got = world.pipeline_images(fill_prompt(ONE, tokens))
    expected = world.script_images(world.concepts[:1], ONE, global_locking=True)
    local = world.script_images(world.concepts[:1], ONE)
    print(f"\n{world.family} global locking: max |pipeline - txt2img| = {_max_diff(got, expected):.2e}")
    assert _max_diff(got, expected) <= TOL and _max_diff(expected, local) > 1e-3


def test_remove_concepts_restores_the_base_pipeline_exactly(world):
    remove_concepts(world.pipe)
    prompt = "a photo of a teddy on the beach"
    tokenizer, embedding, processors = (world.pipe.tokenizer, world.pipe.text_encoder.get_input_embeddings(),
                                        dict(world.pipe.unet.attn_processors))
    base = world.pipeline_images(prompt)
    tokens = apply_concepts(world.pipe, world.concepts, global_locking=True)
    assert not torch.equal(world.pipeline_images(fill_prompt(TWO, tokens)), base)
    remove_concepts(world.pipe)
    assert applied_concepts(world.pipe) is None and "encode_prompt" not in world.pipe.__dict__
    assert world.pipe.tokenizer is tokenizer and world.pipe.text_encoder.get_input_embeddings() is embedding
    assert world.pipe.unet.attn_processors == processors
    assert torch.equal(world.pipeline_images(prompt), base)
    remove_concepts(world.pipe)  # nothing applied: no-op


def test_a_concept_of_the_other_family_is_refused(world, tmp_path_factory):
    remove_concepts(world.pipe)
    other = "sd2" if world.family == "sd1" else "sd1"
    root = tmp_path_factory.mktemp(f"other-{other}")
    ckpt = root / "other.safetensors"
    write_tiny_checkpoint(ckpt, other, seed=1)
    foreign = _write_concepts(load_model_from_config(OmegaConf.load(INFERENCE_CONFIGS[other]), ckpt), root, other)
    with pytest.raises(BadValueError, match=f"trained on base model '{other}'.*but this pipeline is "
                                            f"'{world.family}'") as error:
        apply_concepts(world.pipe, [world.concepts[0], foreign[0]])
    assert "\n" not in str(error.value)
    assert applied_concepts(world.pipe) is None  # nothing was changed


def test_a_concept_of_another_text_encoder_is_refused(world):
    concept = load_concept(world.concepts[0])
    other = ("FrozenOpenCLIPEmbedder:ViT-H-14" if world.family == "sd1"
             else "FrozenCLIPEmbedder:openai/clip-vit-large-patch14")
    concept.metadata["text_encoder"] = f"{other}:width={concept.target_input.shape[0]}"
    with pytest.raises(BadValueError, match=f"trained with text encoder '{other}"):
        apply_concepts(world.pipe, [concept])
    concept.metadata["text_encoder"] = text_encoder_name(world.model.cond_stage_model).replace("width=", "width=1")
    with pytest.raises(BadValueError, match="trained with text encoder"):
        apply_concepts(world.pipe, [concept])


def test_without_diffusers_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match="pip install diffusers"):
        apply_concepts(object(), [tmp_path / "teddy.safetensors"])


def test_a_beta_selected_in_the_concept_file_is_used_as_in_txt2img(world, tmp_path):
    """evaluate.py --select-beta stores a beta/tau in the concept file; apply_concepts (like perfusion_txt2img.py)
    uses it unless beta/tau are given, and not with the other locking mode."""
    selected = tmp_path / "selected.safetensors"
    shutil.copyfile(world.concepts[0], selected)
    update_concept_metadata(selected, {"beta": 0.55, "tau": 0.12, SELECTED_BY_KEY: {"global_locking": False}})
    state = lambda: world.pipe._perfusion_concepts.state  # noqa: E731
    apply_concepts(world.pipe, [selected])
    assert state().beta.tolist() == pytest.approx([0.55]) and state().tau.tolist() == pytest.approx([0.12])
    apply_concepts(world.pipe, [selected], beta=0.7)
    assert state().beta.tolist() == pytest.approx([0.7]) and state().tau.tolist() == pytest.approx([0.12])
    with pytest.warns(UserWarning, match="selected without global locking"):
        apply_concepts(world.pipe, [selected], global_locking=True)
    assert state().beta.tolist() == pytest.approx([inference_gating(1)[0]])
    remove_concepts(world.pipe)


def test_refused_arguments_leave_the_applied_concepts_in_place(world):
    tokens = apply_concepts(world.pipe, world.concepts[:1])
    with pytest.raises(BadValueError, match="'teddy' is already a token"):
        apply_concepts(world.pipe, world.concepts[:1], tokens=["teddy"])
    with pytest.raises(BadValueError, match="one value or one per concept"):
        apply_concepts(world.pipe, world.concepts, beta=[0.5, 0.6, 0.7])
    with pytest.raises(BadValueError, match="nearly the same target input"):
        apply_concepts(world.pipe, [world.concepts[0], world.concepts[0]])
    assert applied_concepts(world.pipe) == tokens
    assert apply_concepts(world.pipe, world.concepts[:1]) == tokens   # applying again replaces, same token
    remove_concepts(world.pipe)
