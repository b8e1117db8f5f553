"""The SD XL base backbone: real-size parameter counts and checkpoint layout (on the meta device, checked against
diffusers' own conversion of that layout), checkpoint round trips, and parity with diffusers' models and
StableDiffusionXLPipeline built by ``from_single_file`` from the same tiny checkpoint with our tiny yaml."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers
import pytest
import torch
import transformers
from diffusers.loaders import single_file_utils as dsf
from omegaconf import OmegaConf

from ldm.models.diffusion.ddpm import checkpoint_family, family_of_text_encoder
from ldm.modules.attention import CrossAttention
from ldm.modules.encoders.modules import CLIP_VIT_L14_TEXT_CONFIG, build_offline_clip_tokenizer, clip_tokenizer_dir
from ldm.util import CheckpointError, instantiate_from_config, load_state_dict, save_state_dict
from sgm.sampling import sample
from tests._tiny_models import TINY_CONFIGS, tiny_config, write_tiny_checkpoint

FULL_CONFIG = "configs/stable-diffusion/sdxl-base.yaml"
TINY_CONFIG = str(TINY_CONFIGS["sdxl"])
TOL = 1e-4

PUBLISHED_UNET = 2_567_463_684  # diffusers' SD XL base UNet
PUBLISHED_VAE = 83_653_863
CLIP_L_PARAMS = 123_060_480  # CLIP ViT-L/14 text tower
BIGG_PARAMS = 694_659_841  # OpenCLIP ViT-bigG/14 text tower with text_projection, plus logit_scale
# sd_xl_base_1.0.safetensors: tensors per component (a CLIP position_ids buffer, if the file has one, is dropped).
LAYOUT = {"model.diffusion_model.": 1680, "first_stage_model.": 248, "conditioner.embedders.0.transformer.": 196,
          "conditioner.embedders.1.model.": 390}
REPRESENTATIVE_KEYS = [
    "model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.label_emb.0.2.bias",
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_v.weight",
    "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight",
    "model.diffusion_model.output_blocks.2.2.conv.weight", "model.diffusion_model.output_blocks.8.0.skip_connection.weight",
    "model.diffusion_model.out.2.weight",
    "first_stage_model.decoder.mid.attn_1.q.weight", "first_stage_model.quant_conv.weight",
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.k_proj.weight",
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
    "conditioner.embedders.1.model.text_projection", "conditioner.embedders.1.model.logit_scale",
    "conditioner.embedders.1.model.positional_embedding", "conditioner.embedders.1.model.ln_final.bias",
]


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _max_diff(a, b):
    return (a - b).abs().max().item()


# ----- full size, on the meta device -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full():
    config = OmegaConf.load(FULL_CONFIG)
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    return OmegaConf.to_container(config, resolve=True), model, model.state_dict()


def test_full_size_parameter_counts_and_cross_attention(full):
    _, model, _ = full
    unet = model.model.diffusion_model
    assert count_params(unet) == PUBLISHED_UNET
    assert count_params(model.first_stage_model) == PUBLISHED_VAE
    clip, open_clip = model.conditioner.text_encoders
    assert (count_params(clip), count_params(open_clip)) == (CLIP_L_PARAMS, BIGG_PARAMS)
    cross = [m for m in unet.modules() if isinstance(m, CrossAttention) and m.is_cross_attention]
    assert len(cross) == 70
    # the Perfusion edit swaps these: plain nn.Linear attributes of the context width
    assert all(type(m.to_k) is torch.nn.Linear and type(m.to_v) is torch.nn.Linear for m in cross)
    assert {m.to_k.in_features for m in cross} == {m.to_v.in_features for m in cross} == {2048}
    assert model.conditioner.context_dim == 2048 and model.conditioner.vector_dim == 2816
    assert model.scale_factor == 0.13025
    assert model.parameterization == "eps" and model.num_timesteps == 1000


def test_full_size_key_set_is_the_original_layout(full):
    _, model, state = full
    assert all(k.startswith(tuple(LAYOUT)) for k in state)  # no schedule buffers, no EMA, nothing else
    assert {p: sum(k.startswith(p) for k in state) for p in LAYOUT} == LAYOUT
    assert len(state) == sum(LAYOUT.values()) == 2514
    assert set(REPRESENTATIVE_KEYS) <= set(state)
    assert checkpoint_family(state).startswith("Stable Diffusion XL")
    assert family_of_text_encoder(type(model.cond_stage_model).__name__) == "sdxl"
    assert model.cond_stage_model is model.conditioner


def _same_keys_and_shapes(converted: dict, reference: torch.nn.Module):
    expected = reference.state_dict()
    assert sorted(set(expected) - set(converted)) == []  # missing in our layout
    assert sorted(set(converted) - set(expected)) == []  # unexpected
    assert [k for k in expected if converted[k].shape != expected[k].shape] == []


def test_full_size_layout_converts_with_diffusers_to_its_sdxl_models(full):
    """diffusers' single-file conversion of our state dict fills its SD XL models exactly: every diffusers weight,
    nothing left over, right shapes (our key counts equal diffusers' one for one, except OpenCLIP's fused q/k/v
    and logit_scale, which diffusers splits and drops)."""
    original, _, state = full
    unet_config = dsf.create_unet_diffusers_config_from_ldm(original, state)
    assert unet_config["addition_embed_type"] == "text_time"
    assert unet_config["projection_class_embeddings_input_dim"] == 2816
    vae_config = dsf.create_vae_diffusers_config_from_ldm(original, state)
    assert vae_config["scaling_factor"] == 0.13025
    clip_config = transformers.CLIPTextConfig(**CLIP_VIT_L14_TEXT_CONFIG)
    bigg_config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                                              num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
                                              hidden_act="gelu", projection_dim=1280)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**unet_config)
        vae = diffusers.AutoencoderKL(**vae_config)
        clip = transformers.CLIPTextModel(clip_config)
        bigg = transformers.CLIPTextModelWithProjection(bigg_config)
    assert count_params(unet) == PUBLISHED_UNET

    converted_unet = dsf.convert_ldm_unet_checkpoint(state, unet_config)
    _same_keys_and_shapes(converted_unet, unet)
    assert len(converted_unet) == LAYOUT["model.diffusion_model."]
    converted_vae = dsf.convert_ldm_vae_checkpoint(state, vae_config)
    _same_keys_and_shapes(converted_vae, vae)
    assert len(converted_vae) == LAYOUT["first_stage_model."]
    converted_clip = dsf.convert_ldm_clip_checkpoint(state)
    if not hasattr(clip, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        converted_clip = {k.removeprefix("text_model."): v for k, v in converted_clip.items()}
    _same_keys_and_shapes(converted_clip, clip)
    converted_bigg = dsf.convert_open_clip_checkpoint(bigg, state, prefix="conditioner.embedders.1.model.")
    _same_keys_and_shapes(converted_bigg, bigg)


# ----- tiny model: checkpoints ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl") / "tiny.safetensors"
    model = write_tiny_checkpoint(path, "sdxl", seed=7)
    return path, model


def test_tiny_checkpoint_loads_with_no_missing_or_unexpected_keys_and_bad_ones_are_refused(tiny, tmp_path):
    path, original = tiny
    state = load_state_dict(path)
    assert all(k.startswith(tuple(LAYOUT)) for k in state)
    fresh = instantiate_from_config(tiny_config("sdxl").model)  # another random init

    partial = tmp_path / "partial.safetensors"
    save_state_dict({k: v for k, v in state.items() if not k.startswith("conditioner.embedders.1.")}, partial)
    with pytest.raises(CheckpointError, match="lacks"):
        fresh.init_from_ckpt(str(partial))
    sd1 = tmp_path / "sd1.safetensors"
    write_tiny_checkpoint(sd1, "sd1")
    with pytest.raises(CheckpointError, match="Stable Diffusion XL.*sdxl-base.yaml"):
        fresh.init_from_ckpt(str(sd1))

    # constants an original file may carry are dropped, not reported
    state["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["denoiser.sigmas"] = torch.ones(1000)
    with_constants = tmp_path / "with_constants.safetensors"
    save_state_dict(state, with_constants)
    missing, unexpected = fresh.init_from_ckpt(str(with_constants))
    assert missing == [] and unexpected == []
    loaded = fresh.state_dict()
    assert set(loaded) == set(original.state_dict())
    for key, value in original.state_dict().items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


def test_unet_vector_condition_is_required_and_class_labels_refused():
    config = tiny_config("sdxl").model.params.unet_config
    unet = instantiate_from_config(config)
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 1280)
    with pytest.raises(ValueError, match="vector condition"):
        unet(x, torch.tensor([10]), context=context)
    config.params.num_classes = 10
    with pytest.raises(NotImplementedError, match="sequential"):
        instantiate_from_config(config)


# ----- tiny model: parity with diffusers ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    """diffusers' SD XL pipeline from the tiny file: UNet and VAE by from_single_file with our yaml, the text
    encoders by diffusers' single-file CLIP conversion (their configs written here: offline, no hub), the
    tokenizers built offline (tokenizer_2 pads with "!" as SD XL's does)."""
    path, ours = tiny
    folder = tmp_path_factory.mktemp("sdxl_configs")
    clip_params = tiny_config("sdxl").model.params.cond_stage_config.params
    clip_cfg = clip_params.clip_params.text_config
    bigg_cfg = clip_params.open_clip_params.model_cfg.text_cfg
    transformers.CLIPTextConfig(**{**CLIP_VIT_L14_TEXT_CONFIG, **clip_cfg}).save_pretrained(folder / "text_encoder")
    transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=bigg_cfg.width, intermediate_size=int(bigg_cfg.width * bigg_cfg.mlp_ratio),
        num_hidden_layers=bigg_cfg.layers, num_attention_heads=bigg_cfg.heads, max_position_embeddings=77,
        hidden_act="gelu", projection_dim=clip_params.open_clip_params.model_cfg.embed_dim,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0).save_pretrained(folder / "text_encoder_2")
    checkpoint = dsf.load_single_file_checkpoint(str(path))
    text_encoder = dsf.create_diffusers_clip_model_from_ldm(transformers.CLIPTextModel, checkpoint,
                                                            config=str(folder / "text_encoder"), local_files_only=True)
    text_encoder_2 = dsf.create_diffusers_clip_model_from_ldm(
        transformers.CLIPTextModelWithProjection, checkpoint, config=str(folder / "text_encoder_2"),
        local_files_only=True)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
                                        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    pipe = diffusers.StableDiffusionXLPipeline.from_single_file(
        str(path), original_config=TINY_CONFIG, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=build_offline_clip_tokenizer(),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()), pad_token="!"),
        scheduler=scheduler, add_watermarker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.addition_embed_type == "text_time"  # diffusers recognised SD XL's UNet
    return ours, pipe


PROMPTS = ["a photo of a teddy bear on the beach", ""]


@torch.no_grad()
def test_text_encoders_match(converted):
    ours, pipe = converted
    clip, open_clip = ours.conditioner.text_encoders
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids_2 = pipe.tokenizer_2(PROMPTS, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
    assert torch.equal(ids, clip.tokenize(PROMPTS)) and torch.equal(ids_2, open_clip.tokenize(PROMPTS))
    expected = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    expected_2 = pipe.text_encoder_2(ids_2, output_hidden_states=True)
    hidden, pooled = open_clip.encode_tokens_with_pooled(ids_2)
    assert _max_diff(clip.encode_tokens(ids), expected) <= TOL
    assert _max_diff(hidden, expected_2.hidden_states[-2]) <= TOL
    assert _max_diff(pooled, expected_2.text_embeds) <= TOL
    assert expected.std() > 0.1 and expected_2.text_embeds.std() > 0.1
    # the pipeline's own prompt encoding = our conditioning dict
    embeds, _, pooled_embeds, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    cond = ours.get_learned_conditioning(PROMPTS)
    assert _max_diff(cond["crossattn"], embeds) <= TOL
    assert _max_diff(cond["vector"][:, :pooled_embeds.shape[1]], pooled_embeds) <= TOL


@torch.no_grad()
def test_unet_noise_prediction_matches(converted):
    ours, pipe = converted
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    sizes = {"original_size_as_tuple": torch.tensor([[32, 32], [64, 48], [1024, 768]]),
             "crop_coords_top_left": torch.tensor([[0, 0], [8, 4], [100, 0]]),
             "target_size_as_tuple": torch.tensor([[32, 32], [32, 32], [1024, 1024]])}
    cond = ours.get_learned_conditioning({"txt": ["a teddy", "a red car", ""], **sizes})
    time_ids = torch.cat([sizes[k] for k in ("original_size_as_tuple", "crop_coords_top_left",
                                             "target_size_as_tuple")], dim=1).float()
    pooled_dim = ours.conditioner.pooled_dim
    t = torch.tensor([1, 421, 999])
    expected = pipe.unet(x, t, encoder_hidden_states=cond["crossattn"],
                         added_cond_kwargs={"text_embeds": cond["vector"][:, :pooled_dim], "time_ids": time_ids}).sample
    got = ours.apply_model(x, t, cond)
    assert expected.std() > 0.05
    assert _max_diff(got, expected) <= TOL
    # the size conditioning matters (it is not silently dropped)
    resized = ours.apply_model(x, t, ours.get_learned_conditioning({"txt": ["a teddy", "a red car", ""]}))
    assert _max_diff(resized, got) > 1e-3


@torch.no_grad()
def test_vae_encode_decode_match(converted):
    ours, pipe = converted
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(2, 4, 8, 8, generator=g)
    assert _max_diff(ours.encode_first_stage(image).mean, pipe.vae.encode(image).latent_dist.mean) <= TOL
    assert _max_diff(ours.encode_first_stage(image).logvar, pipe.vae.encode(image).latent_dist.logvar) <= TOL
    assert _max_diff(ours.first_stage_model.decode(z), pipe.vae.decode(z).sample) <= TOL
    assert ours.scale_factor == pytest.approx(pipe.vae.config.scaling_factor) == 0.13025


@torch.no_grad()
def test_ddim_cfg_sample_matches_diffusers_pipeline(converted):
    """10 guided DDIM steps through our sgm sampler = StableDiffusionXLPipeline with the same start latents (an
    explicit empty negative prompt: both encode it; 32x32 images, so the size conditioning is (32, 32, 0, 0, 32, 32)
    on both sides)."""
    ours, pipe = converted
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    prompts = ["a photo of a teddy bear", "a red car"]
    expected = pipe(prompt=prompts, negative_prompt=["", ""], height=32, width=32, num_inference_steps=10,
                    guidance_scale=3.0, latents=x_T.clone(), output_type="latent").images
    cond = ours.get_learned_conditioning(prompts)
    uc = ours.get_learned_conditioning(["", ""])
    got = sample(ours, cond, x_T.clone(), uc, steps=10, scale=3.0)
    assert _max_diff(expected, x_T) > 1.0
    assert _max_diff(got, expected) <= TOL
