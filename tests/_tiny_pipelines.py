"""diffusers ``StableDiffusionPipeline``s built offline from a tiny original-layout checkpoint (tests/_tiny_models.py).

UNet and VAE come from diffusers' ``from_single_file`` with the tiny config as ``original_config``; the text encoder
is a transformers ``CLIPTextModel`` of the tiny sizes, filled by diffusers' own checkpoint conversion (SD1: CLIP keys,
SD2: OpenCLIP keys, the last block dropped as SD 2.x's penultimate layer); the tokenizer is our offline CLIP BPE
(``build_offline_clip_tokenizer``), padding with "!" (id 0) for SD2 as OpenCLIP does; the scheduler is diffusers'
DDIMScheduler on the original 'leading, +1' timesteps of the model's schedule. Nothing is downloaded.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests._tiny_models import TINY_CONFIGS, tiny_config

__all__ = ["tiny_pipeline", "tiny_scheduler"]


def tiny_scheduler(family: str):
    """DDIMScheduler matching the tiny family's noise schedule and parameterization (eps for sd1, v for sd2)."""
    import diffusers

    params = tiny_config(family).model.params
    prediction = "v_prediction" if params.get("parameterization", "eps") == "v" else "epsilon"
    return diffusers.DDIMScheduler(num_train_timesteps=int(params.timesteps), beta_start=float(params.linear_start),
                                   beta_end=float(params.linear_end), beta_schedule="scaled_linear",
                                   clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                   timestep_spacing="leading", prediction_type=prediction)


def _text_encoder(family: str, state: dict):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.modules.encoders.modules import CLIP_VIT_L14_TEXT_CONFIG

    encoder_params = tiny_config(family).model.params.cond_stage_config.params
    if family == "sd1":
        config = CLIPTextConfig(**{**CLIP_VIT_L14_TEXT_CONFIG, **dict(encoder_params.text_config)})
        converted = convert_ldm_clip_checkpoint(state)
    else:
        cfg = encoder_params.model_cfg
        text = cfg.text_cfg
        width, layers = int(text.width), int(text.layers)
        # SD 2.x reads OpenCLIP's penultimate layer (then ln_final): diffusers' text encoder is one block shorter.
        config = CLIPTextConfig(vocab_size=int(text.vocab_size), hidden_size=width, intermediate_size=4 * width,
                                num_hidden_layers=layers - 1, num_attention_heads=int(text.heads),
                                max_position_embeddings=int(text.context_length), hidden_act="gelu",
                                layer_norm_eps=1e-5, projection_dim=int(cfg.embed_dim), bos_token_id=49406,
                                eos_token_id=49407, pad_token_id=0)
        model = CLIPTextModel(config)
        converted = convert_open_clip_checkpoint(model, state, prefix="cond_stage_model.model.")
    model = CLIPTextModel(config)
    wrapped = hasattr(model, "text_model")
    converted = {(k if wrapped else k.removeprefix("text_model.")): v for k, v in converted.items()}
    expected = model.state_dict()
    weights = {k: v for k, v in converted.items() if k in expected}
    missing = sorted(k for k in expected if k not in weights and not k.endswith("position_ids"))
    if missing:
        raise RuntimeError(f"tiny {family} text encoder: checkpoint conversion left {missing[:4]} unfilled")
    model.load_state_dict(weights, strict=False)
    return model.eval()


def tiny_pipeline(family: str, checkpoint_path):
    """A ``StableDiffusionPipeline`` (CPU, float32, progress bar off, no safety checker) of the tiny ``family``
    ("sd1" or "sd2") checkpoint at ``checkpoint_path`` (.safetensors or .ckpt, original layout); it makes 32x32
    images from 8x8 latents by default."""
    import diffusers

    from ldm.modules.encoders.modules import build_offline_clip_tokenizer
    from ldm.util import load_state_dict

    if family not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny family '{family}' (use {sorted(TINY_CONFIGS)})")
    path, original_config = os.fspath(checkpoint_path), str(TINY_CONFIGS[family])
    unet = diffusers.UNet2DConditionModel.from_single_file(path, original_config=original_config).eval()
    vae = diffusers.AutoencoderKL.from_single_file(path, original_config=original_config).eval()
    # the conversion assumes SD's sizes; the tiny model makes 8x8 latents, 32x32 images (the pipeline's default size)
    params = tiny_config(family).model.params
    unet.register_to_config(sample_size=int(params.image_size))
    vae.register_to_config(sample_size=int(params.first_stage_config.params.ddconfig.resolution))
    text_encoder = _text_encoder(family, load_state_dict(path))
    tokenizer = build_offline_clip_tokenizer()
    if family == "sd2":
        tokenizer.pad_token = "!"    # OpenCLIP pads with id 0, which is "!" in CLIP's BPE vocabulary
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=tiny_scheduler(family), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
