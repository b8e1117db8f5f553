"""Stable Diffusion 1.x / 2.x base models saved in the diffusers folder format, read into the original key layout.

A diffusers model folder (``StableDiffusionPipeline.save_pretrained``) holds one sub-folder per component::

    model_index.json                      (optional here)
    unet/config.json + diffusion_pytorch_model.safetensors (or .bin)
    vae/config.json  + diffusion_pytorch_model.safetensors (or .bin)
    text_encoder/config.json + model.safetensors (or pytorch_model.bin)
    tokenizer/, scheduler/scheduler_config.json (optional)

``load_diffusers_folder`` reads the three networks and renames their tensors to the CompVis/Stability layout that
our model classes use (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``), so that a folder
can be given wherever a single-file base checkpoint is taken (``--ckpt``, ``model.params.ckpt_path``). ``.bin`` files
are read with ``torch.load(weights_only=True)``: a pickle that would run code is refused, never executed.

The renaming is written out here block by block (nothing is imported from diffusers). The layouts:

UNet (L = layers_per_block, N = number of resolutions)::

    time_embedding.linear_1 / linear_2      -> time_embed.0 / time_embed.2
    conv_in                                 -> input_blocks.0.0
    down_blocks.i.resnets.j                 -> input_blocks.(1 + i*(L+1) + j).0
    down_blocks.i.attentions.j              -> input_blocks.(1 + i*(L+1) + j).1
    down_blocks.i.downsamplers.0.conv       -> input_blocks.((i+1)*(L+1)).0.op
    mid_block.resnets.0 / attentions.0 / resnets.1 -> middle_block.0 / .1 / .2
    up_blocks.i.resnets.j (j <= L)          -> output_blocks.(i*(L+1) + j).0
    up_blocks.i.attentions.j                -> output_blocks.(i*(L+1) + j).1
    up_blocks.i.upsamplers.0.conv           -> output_blocks.(i*(L+1) + L).{1, or 2 after an attention}.conv
    conv_norm_out / conv_out                -> out.0 / out.2
    inside a resnet: norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut
                  -> in_layers.0, in_layers.2, emb_layers.1, out_layers.0, out_layers.3, skip_connection
    inside an attention (spatial transformer): the same names on both sides.

VAE::

    encoder.down_blocks.i.resnets.j         -> encoder.down.i.block.j   (downsamplers.0 -> downsample)
    decoder.up_blocks.i.resnets.j           -> decoder.up.(N-1-i).block.j   (upsamplers.0 -> upsample)
    {en,de}coder.mid_block.resnets.0 / .1   -> mid.block_1 / mid.block_2
    {en,de}coder.mid_block.attentions.0     -> mid.attn_1: group_norm -> norm, to_q/to_k/to_v -> q/k/v,
                                               to_out.0 -> proj_out; linear (C, C) weights become 1x1 convs
                                               (C, C, 1, 1). Old diffusers names query/key/value/proj_attn too.
    conv_norm_out -> norm_out; inside a resnet conv_shortcut -> nin_shortcut; the rest keeps its name.

Text encoder, SD 1.x (transformers CLIPTextModel, the same module as ours): ``[text_model.]X`` ->
``cond_stage_model.transformer.text_model.X`` (transformers 5 saves the keys without ``text_model.``).

Text encoder, SD 2.x (OpenCLIP ViT-H/14 saved as a transformers CLIPTextModel) -> ``cond_stage_model.model.*``::

    embeddings.token_embedding.weight       -> token_embedding.weight
    embeddings.position_embedding.weight    -> positional_embedding
    encoder.layers.i.layer_norm1 / 2        -> transformer.resblocks.i.ln_1 / ln_2
    encoder.layers.i.self_attn.{q,k,v}_proj -> transformer.resblocks.i.attn.in_proj_weight / in_proj_bias
                                               (q, k, v stacked in that order along the output dimension)
    encoder.layers.i.self_attn.out_proj     -> transformer.resblocks.i.attn.out_proj
    encoder.layers.i.mlp.fc1 / fc2          -> transformer.resblocks.i.mlp.c_fc / c_proj
    final_layer_norm                        -> ln_final
    text_projection.weight (only in CLIPTextModelWithProjection) -> text_projection (transposed)

diffusers' SD 2.x text encoders stop one block early (23 of OpenCLIP's 24: SD 2.x reads the penultimate layer) and
have no ``text_projection`` or ``logit_scale``. ``FrozenOpenCLIPEmbedder`` with ``layer: penultimate`` does not use
those weights either (``unused_weight_names``); ``fill_unused_text_encoder_weights`` keeps the model's own values for
them, so that loading succeeds and samples are unchanged.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping

import torch

from ldm.util import CheckpointError

# Sub-folders a Stable Diffusion model folder must have, and the stems of their weight files
# (text_encoder: model.safetensors, or pytorch_model.bin as transformers writes it).
COMPONENTS = {"unet": ("diffusion_pytorch_model",), "vae": ("diffusion_pytorch_model",),
              "text_encoder": ("model", "pytorch_model")}
# diffusers' scheduler prediction_type -> our parameterization
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x (CLIP ViT-L/14 text encoder)",
                "sd2": "Stable Diffusion 2.x (OpenCLIP ViT-H/14 text encoder)"}
FAMILY_CONFIGS = {"sd1": "configs/perfusion_inference.yaml (or configs/stable-diffusion/v1-inference.yaml)",
                  "sd2": "configs/perfusion_inference_sd_v2.yaml (or configs/stable-diffusion/v2-inference*.yaml)"}
RESAVE_HINT = ("if you trust the folder, load it once with diffusers and save it again with "
               "pipeline.save_pretrained(folder, safe_serialization=True), which writes .safetensors files")


# ----- the folder ------------------------------------------------------------------------------------------------
def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder with the ``unet/`` sub-folder of a diffusers model (the rest is checked when
    it is read)."""
    path = Path(path)
    return path.is_dir() and ((path / "unet").is_dir() or (path / "model_index.json").is_file())


def diffusers_folder_problem(path: str | os.PathLike) -> str | None:
    """None when ``path`` looks like a usable Stable Diffusion diffusers folder, otherwise what is wrong with it."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a folder"
    index = _read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    pipeline = str(index.get("_class_name", ""))
    if "XL" in pipeline or (path / "text_encoder_2").is_dir():
        return (f"{path} is a Stable Diffusion XL folder ({pipeline or 'it has text_encoder_2/'}); only Stable "
                "Diffusion 1.x and 2.x base models are supported")
    missing = [name for name in COMPONENTS if not (path / name / "config.json").is_file()]
    if missing:
        return (f"{path} is not a diffusers Stable Diffusion folder: it lacks "
                f"{', '.join(f'{m}/config.json' for m in missing)} (a folder written by "
                "StableDiffusionPipeline.save_pretrained has unet/, vae/, text_encoder/ and tokenizer/)")
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable JSON file ({err})") from err


def _weight_files(folder: Path, stems: tuple[str, ...]) -> list[Path]:
    """The weight files of one component: a single file or the shards named by an ``*.index.json``; safetensors
    before .bin, full precision before the fp16 variant."""
    for variant in ("", ".fp16"):
        for extension in ("safetensors", "bin"):
            for stem in stems:
                single = folder / f"{stem}{variant}.{extension}"
                if single.is_file():
                    return [single]
                index = folder / f"{stem}{variant}.{extension}.index.json"
                if index.is_file():
                    shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
                    missing = [s for s in shards if not (folder / s).is_file()]
                    if missing or not shards:
                        raise CheckpointError(f"{index} names shards that are not in {folder}: {missing[:3]}")
                    return [folder / s for s in shards]
    names = ", ".join(f"{s}.safetensors" for s in stems)
    raise CheckpointError(f"{folder} has no weights: expected {names} (or .bin, or a sharded *.index.json)")


def read_component(folder: str | os.PathLike, component: str) -> dict[str, torch.Tensor]:
    """The tensors of one component (``unet``, ``vae``, ``text_encoder``) in diffusers' own names."""
    from ldm.util import load_state_dict

    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(folder) / component, COMPONENTS[component]):
        try:
            tensors.update(load_state_dict(file))
        except CheckpointError as err:
            if file.suffix == ".bin" and "refusing to load" in str(err):
                raise CheckpointError(f"{err}\nFor the diffusers folder {folder}: {RESAVE_HINT}.") from err
            raise
    return tensors


def folder_family(folder: str | os.PathLike) -> tuple[str, str]:
    """(``sd1`` or ``sd2``, why): judged by the text encoder's config (hidden size 768 = CLIP ViT-L/14,
    1024 = OpenCLIP ViT-H/14; other sizes by the activation: OpenAI CLIP uses quick_gelu, OpenCLIP gelu)."""
    config_path = Path(folder) / "text_encoder" / "config.json"
    config = _read_json(config_path)
    hidden, act = config.get("hidden_size"), config.get("hidden_act")
    if hidden == 768:
        return "sd1", "text encoder hidden size 768 (CLIP ViT-L/14)"
    if hidden == 1024:
        return "sd2", "text encoder hidden size 1024 (OpenCLIP ViT-H/14)"
    if act == "quick_gelu":
        return "sd1", f"text encoder hidden size {hidden} with quick_gelu (OpenAI CLIP)"
    if act == "gelu":
        return "sd2", f"text encoder hidden size {hidden} with gelu (OpenCLIP)"
    raise CheckpointError(f"{config_path}: cannot tell whether this is a Stable Diffusion 1.x or 2.x text encoder "
                          f"(hidden_size {hidden}, hidden_act {act})")


def load_diffusers_folder(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All weights of a diffusers Stable Diffusion 1.x/2.x folder, renamed to the original checkpoint layout."""
    folder = Path(folder)
    problem = diffusers_folder_problem(folder)
    if problem:
        raise CheckpointError(problem)
    family, _ = folder_family(folder)
    unet_config = _read_json(folder / "unet" / "config.json")
    vae_config = _read_json(folder / "vae" / "config.json")
    state: dict[str, torch.Tensor] = {}
    state.update(_prefixed("model.diffusion_model.", convert_unet(read_component(folder, "unet"), unet_config)))
    state.update(_prefixed("first_stage_model.", convert_vae(read_component(folder, "vae"), vae_config)))
    text = read_component(folder, "text_encoder")
    if family == "sd1":
        state.update(_prefixed("cond_stage_model.transformer.text_model.", convert_clip_text_encoder(text)))
    else:
        state.update(_prefixed("cond_stage_model.model.", convert_open_clip_text_encoder(text)))
    return state


def _prefixed(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in tensors.items()}


# ----- checks against the model a config builds -----------------------------------------------------------------
def check_folder_matches_model(folder: str | os.PathLike, model) -> None:
    """One clear error when the folder's model family, prediction type or latent scale is not what the config
    builds (``model`` is the LatentDiffusion about to be loaded)."""
    from ldm.models.diffusion.ddpm import family_of_text_encoder

    folder = Path(folder)
    problem = diffusers_folder_problem(folder)
    if problem:
        raise CheckpointError(problem)
    encoder = getattr(model, "cond_stage_model", None)
    if encoder is not None:
        family, why = folder_family(folder)
        model_family = family_of_text_encoder(type(encoder).__name__)
        if model_family in FAMILY_NAMES and model_family != family:
            raise CheckpointError(
                f"diffusers folder {folder} holds {FAMILY_NAMES[family]} [{why}], but the config builds "
                f"{FAMILY_NAMES[model_family]}. Fix: use {FAMILY_CONFIGS[family]} with this folder, or give a "
                f"{model_family} model.")
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    if scheduler_path.is_file():
        prediction = _read_json(scheduler_path).get("prediction_type", "epsilon")
        ours = PREDICTION_TYPES.get(prediction)
        if ours is not None and ours != model.parameterization:
            raise CheckpointError(
                f"diffusers folder {folder} predicts '{prediction}' ({scheduler_path}), but the config's "
                f"parameterization is '{model.parameterization}'. Fix: set model.params.parameterization: {ours} "
                f"in the config (SD 2.x 768-v models use v, SD 1.x and SD 2.x -base models eps).")
    scaling = _read_json(folder / "vae" / "config.json").get("scaling_factor")
    scale_factor = float(getattr(model, "scale_factor", 1.0))
    if scaling is not None and hasattr(model, "first_stage_model") and abs(float(scaling) - scale_factor) > 1e-6:
        raise CheckpointError(
            f"diffusers folder {folder} scales its latents by {scaling} (vae/config.json scaling_factor), but the "
            f"config's scale_factor is {scale_factor:g}. Fix: set model.params.scale_factor: {scaling} in the "
            "config.")


def fill_unused_text_encoder_weights(state: dict[str, torch.Tensor], encoder,
                                     prefix: str = "cond_stage_model.") -> list[str]:
    """Add to ``state`` the encoder's own value of each weight the encoder does not use and ``state`` lacks
    (a diffusers SD 2.x folder has no last OpenCLIP block, text_projection or logit_scale); ``prefix`` is the
    encoder's place in ``state``. Returns the keys added."""
    own = encoder.state_dict()
    names = getattr(encoder, "unused_weight_names", lambda: [])()
    added = [name for name in names if prefix + name not in state and name in own]
    for name in added:
        state[prefix + name] = own[name].detach().clone()
    return [prefix + name for name in added]


# ----- UNet ------------------------------------------------------------------------------------------------------
UNET_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                     "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP_LEVEL = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                  "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
UNET_UNSUPPORTED = ("class_embedding", "add_embedding", "encoder_hid_proj", "add_time_proj")


def _unet_block_names(levels: int, layers: int, up_has_attention) -> dict[str, tuple[str, bool]]:
    """diffusers block prefix -> (original block prefix, is a resnet) for a UNet of ``levels`` resolutions with
    ``layers`` resnets per down block."""
    names: dict[str, tuple[str, bool]] = {}
    for i in range(levels):
        for j in range(layers):
            block = 1 + i * (layers + 1) + j
            names[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{block}.0", True)
            names[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{block}.1", False)
        if i < levels - 1:
            names[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{(i + 1) * (layers + 1)}.0.op", False)
    names["mid_block.resnets.0"] = ("middle_block.0", True)
    names["mid_block.attentions.0"] = ("middle_block.1", False)
    names["mid_block.resnets.1"] = ("middle_block.2", True)
    for i in range(levels):
        for j in range(layers + 1):  # up blocks have one resnet more (it takes the skip of the downsampler)
            block = i * (layers + 1) + j
            names[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{block}.0", True)
            names[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{block}.1", False)
        if i < levels - 1:
            last = i * (layers + 1) + layers
            position = 2 if up_has_attention(i) else 1
            names[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{last}.{position}.conv", False)
    return names


def convert_unet(tensors: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel weights -> ``model.diffusion_model.*`` names (without that prefix)."""
    unsupported = sorted({k.split(".")[0] for k in tensors if k.startswith(UNET_UNSUPPORTED)})
    if unsupported:
        raise CheckpointError(f"the UNet has {', '.join(unsupported)}: it is not a Stable Diffusion 1.x/2.x "
                              "text-to-image UNet, which this loader reads")
    levels = len(config["block_out_channels"])
    layers = int(config["layers_per_block"])

    def up_has_attention(i: int) -> bool:
        return any(k.startswith(f"up_blocks.{i}.attentions.") for k in tensors)

    blocks = _unet_block_names(levels, layers, up_has_attention)
    converted: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        converted[_rename_unet_key(key, blocks)] = value
    return converted


def _rename_unet_key(key: str, blocks: Mapping[str, tuple[str, bool]]) -> str:
    for diffusers_name, original_name in UNET_TOP_LEVEL.items():
        if key.startswith(diffusers_name + "."):
            return original_name + key[len(diffusers_name):]
    match = re.match(r"((?:down_blocks|up_blocks)\.\d+\.(?:resnets|attentions|downsamplers|upsamplers)\.\d+"
                     r"(?:\.conv)?|mid_block\.(?:resnets|attentions)\.\d+)\.(.+)", key)
    if match is None or match.group(1) not in blocks:
        raise CheckpointError(f"unexpected UNet weight '{key}': the folder's UNet is not laid out like a Stable "
                              "Diffusion 1.x/2.x UNet (check unet/config.json: layers_per_block, block_out_channels)")
    original, is_resnet = blocks[match.group(1)]
    rest = match.group(2)
    if is_resnet:
        layer, _, parameter = rest.partition(".")
        if layer not in UNET_RESNET_NAMES:
            raise CheckpointError(f"unexpected UNet weight '{key}' (unknown resnet layer '{layer}')")
        rest = f"{UNET_RESNET_NAMES[layer]}.{parameter}"
    return f"{original}.{rest}"


# ----- VAE -------------------------------------------------------------------------------------------------------
VAE_RESNET_NAMES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                    "conv_shortcut": "nin_shortcut"}
# diffusers attention layer -> original AttnBlock layer; the first names are current diffusers, the second older
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                       "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
VAE_SAME_NAMES = ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.", "quant_conv.",
                  "post_quant_conv.")


def convert_vae(tensors: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL weights -> ``first_stage_model.*`` names (without that prefix)."""
    levels = len(config["block_out_channels"])
    converted: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        new_key, is_attention = _rename_vae_key(key, levels)
        if is_attention and new_key.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]  # linear (C_out, C_in) -> 1x1 convolution (C_out, C_in, 1, 1)
        converted[new_key] = value
    return converted


def _rename_vae_key(key: str, levels: int) -> tuple[str, bool]:
    """(original name, whether it is an attention weight)."""
    if key.startswith(VAE_SAME_NAMES):
        return key, False
    for part in ("encoder", "decoder"):
        if key.startswith(f"{part}.conv_norm_out."):
            return f"{part}.norm_out." + key[len(f"{part}.conv_norm_out."):], False
    match = re.match(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|"
                     r"upsamplers)\.(\d+)\.(.+)", key)
    if match:
        part, kind, i, sub, j, rest = match.groups()
        level = int(i) if kind == "down_blocks" else levels - 1 - int(i)  # the decoder counts up from the bottom
        stage = "down" if kind == "down_blocks" else "up"
        if sub == "resnets":
            return f"{part}.{stage}.{level}.block.{j}.{_vae_resnet_layer(key, rest)}", False
        if sub == "attentions":
            return f"{part}.{stage}.{level}.attn.{j}.{_vae_attention_layer(key, rest)}", True
        if rest.startswith("conv."):  # downsamplers.0.conv / upsamplers.0.conv
            return f"{part}.{stage}.{level}.{'downsample' if sub == 'downsamplers' else 'upsample'}.{rest}", False
    match = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d)\.(.+)", key)
    if match:
        part, sub, j, rest = match.groups()
        if sub == "resnets" and j in "01":
            return f"{part}.mid.block_{int(j) + 1}.{_vae_resnet_layer(key, rest)}", False
        if sub == "attentions" and j == "0":
            return f"{part}.mid.attn_1.{_vae_attention_layer(key, rest)}", True
    raise CheckpointError(f"unexpected VAE weight '{key}': the folder's VAE is not a Stable Diffusion AutoencoderKL")


def _vae_resnet_layer(key: str, rest: str) -> str:
    layer, _, parameter = rest.partition(".")
    if layer not in VAE_RESNET_NAMES:
        raise CheckpointError(f"unexpected VAE weight '{key}' (unknown resnet layer '{layer}')")
    return f"{VAE_RESNET_NAMES[layer]}.{parameter}"


def _vae_attention_layer(key: str, rest: str) -> str:
    layer, _, parameter = rest.rpartition(".")
    if layer not in VAE_ATTENTION_NAMES:
        raise CheckpointError(f"unexpected VAE weight '{key}' (unknown attention layer '{layer}')")
    return f"{VAE_ATTENTION_NAMES[layer]}.{parameter}"


# ----- text encoders ---------------------------------------------------------------------------------------------
# Keys of a saved CLIPTextModel that are not weights of ours: a constant buffer and the projection head of
# CLIPTextModelWithProjection (SD 1.x uses the last hidden state, not the projected embedding).
CLIP_IGNORED = ("embeddings.position_ids", "text_projection.weight")


def _without_text_model_level(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 4 saves CLIPTextModel weights as ``text_model.X``, transformers 5 as ``X``: both give ``X``."""
    return {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in tensors.items()}


def convert_clip_text_encoder(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 1.x text encoder: the same module as ours, keys relative to ``cond_stage_model.transformer.text_model.``."""
    return {k: v for k, v in _without_text_model_level(tensors).items() if not k.endswith(CLIP_IGNORED)}


OPEN_CLIP_LAYER_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                         "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
OPEN_CLIP_TOP_LEVEL = {"embeddings.token_embedding.weight": "token_embedding.weight",
                       "embeddings.position_embedding.weight": "positional_embedding",
                       "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def convert_open_clip_text_encoder(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 2.x text encoder (OpenCLIP saved as CLIPTextModel) -> keys relative to ``cond_stage_model.model.``."""
    tensors = _without_text_model_level(tensors)
    converted: dict[str, torch.Tensor] = {}
    projections: dict[tuple[str, str, str], torch.Tensor] = {}  # (layer, q/k/v, weight/bias) -> tensor
    for key, value in tensors.items():
        if key == "embeddings.position_ids":
            continue
        if key in OPEN_CLIP_TOP_LEVEL:
            converted[OPEN_CLIP_TOP_LEVEL[key]] = value
            continue
        if key == "text_projection.weight":  # nn.Linear (out, in); OpenCLIP multiplies x @ text_projection
            converted["text_projection"] = value.t().contiguous()
            continue
        match = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        if match is None:
            raise CheckpointError(f"unexpected text encoder weight '{key}' for an OpenCLIP (SD 2.x) text encoder")
        layer, name, parameter = match.groups()
        qkv = re.fullmatch(r"self_attn\.([qkv])_proj", name)
        if qkv:
            projections[(layer, qkv.group(1), parameter)] = value
        elif name in OPEN_CLIP_LAYER_NAMES:
            converted[f"transformer.resblocks.{layer}.{OPEN_CLIP_LAYER_NAMES[name]}.{parameter}"] = value
        else:
            raise CheckpointError(f"unexpected text encoder weight '{key}' for an OpenCLIP (SD 2.x) text encoder")
    for layer, parameter in sorted({(layer, parameter) for layer, _, parameter in projections}):
        parts = [projections.get((layer, which, parameter)) for which in "qkv"]
        if any(p is None for p in parts):
            raise CheckpointError(f"text encoder layer {layer} lacks one of its q/k/v_proj.{parameter} tensors")
        # nn.MultiheadAttention keeps q, k and v as one (3 * width, width) matrix, in that order
        converted[f"transformer.resblocks.{layer}.attn.in_proj_{parameter}"] = torch.cat(parts, dim=0)
    return converted
