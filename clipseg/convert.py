"""Key mapping between the original ClipSeg layout and transformers' CLIPSegForImageSegmentation.

Original layout (timojl/clipseg `CLIPDensePredT`):
  * CLIP backbone in OpenAI layout (`visual.conv1.weight`, `transformer.resblocks.N.attn.in_proj_weight`, ...),
    shipped separately (OpenAI `ViT-B-16.pt`) or under `clip_model.` in a full model state dict;
  * decoder (`rd64-uni-refined.pth`): `film_mul`, `film_add`, `reduces.N`, `blocks.N` (torch
    `nn.TransformerEncoderLayer`: fused `self_attn.in_proj_*`, `linear1/2`, `norm1/2`) and `trans_conv`
    (a single ConvTranspose2d, or Conv-ReLU-ConvT-ReLU-ConvT for the "refined" weights).
transformers layout: `clip.*` (CLIPSegModel) and `decoder.*` (CLIPSegDecoder), separate q/k/v projections and
Linear projections stored transposed relative to OpenAI's `x @ proj` matrices.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch

# Top-level CLIP tensors: original name -> (transformers name, stored transposed?)
_CLIP_TOP_LEVEL = {
    "visual.class_embedding": ("clip.vision_model.embeddings.class_embedding", False),
    "visual.conv1.weight": ("clip.vision_model.embeddings.patch_embedding.weight", False),
    "visual.positional_embedding": ("clip.vision_model.embeddings.position_embedding.weight", False),
    "visual.ln_pre.weight": ("clip.vision_model.pre_layrnorm.weight", False),
    "visual.ln_pre.bias": ("clip.vision_model.pre_layrnorm.bias", False),
    "visual.ln_post.weight": ("clip.vision_model.post_layernorm.weight", False),
    "visual.ln_post.bias": ("clip.vision_model.post_layernorm.bias", False),
    "visual.proj": ("clip.visual_projection.weight", True),
    "token_embedding.weight": ("clip.text_model.embeddings.token_embedding.weight", False),
    "positional_embedding": ("clip.text_model.embeddings.position_embedding.weight", False),
    "ln_final.weight": ("clip.text_model.final_layer_norm.weight", False),
    "ln_final.bias": ("clip.text_model.final_layer_norm.bias", False),
    "text_projection": ("clip.text_projection.weight", True),
    "logit_scale": ("clip.logit_scale", False),
}
_DECODER_TOP_LEVEL_PREFIXES = {
    "film_mul.": "decoder.film_mul.",
    "film_add.": "decoder.film_add.",
    "trans_conv.": "decoder.transposed_convolution.",
}
# Transformer blocks: (original prefix, transformers prefix, original sub-name -> transformers sub-name, fused qkv)
_CLIP_BLOCK_PARTS = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_DECODER_BLOCK_PARTS = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "linear1": "mlp.fc1",
    "linear2": "mlp.fc2",
    "self_attn.out_proj": "self_attn.out_proj",
}
_BLOCK_GROUPS = (
    ("visual.transformer.resblocks.", "clip.vision_model.encoder.layers.", _CLIP_BLOCK_PARTS, "attn.in_proj_"),
    ("transformer.resblocks.", "clip.text_model.encoder.layers.", _CLIP_BLOCK_PARTS, "attn.in_proj_"),
    ("blocks.", "decoder.layers.", _DECODER_BLOCK_PARTS, "self_attn.in_proj_"),
)
_REDUCES = ("reduces.", "decoder.reduces.")

# Original tensors with no transformers counterpart that are safe to drop:
#  reduce.*        - an nn.Linear CLIPDenseBase creates but CLIPDensePredT.forward never uses
#  model.*         - CLIPDenseBase.model is an alias of clip_model.visual (duplicate tensors in full state dicts)
#  input_resolution/context_length/vocab_size, *attn_mask - metadata/buffers in OpenAI's TorchScript archives
_IGNORED_ORIGINAL = re.compile(r"^(reduce\.(weight|bias)|model\..*|input_resolution|context_length|vocab_size|.*attn_mask)$")


def _split_block_key(key: str, group_prefix: str) -> tuple[str, str] | None:
    """'visual.transformer.resblocks.3.ln_1.weight' -> ('3', 'ln_1.weight') for that group prefix."""
    if not key.startswith(group_prefix):
        return None
    index, _, rest = key[len(group_prefix):].partition(".")
    return (index, rest) if index.isdigit() and rest else None


def original_to_hf(clip_state: Mapping[str, torch.Tensor], decoder_state: Mapping[str, torch.Tensor]) -> dict:
    """Convert OpenAI-layout CLIP tensors + original ClipSeg decoder tensors to transformers CLIPSeg keys.

    Raises ValueError naming any key it does not know (e.g. weights trained with extra_blocks/reduce_cond,
    which transformers' CLIPSeg cannot represent).
    """
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for source_name, state in (("CLIP", clip_state), ("decoder", decoder_state)):
        for key, tensor in state.items():
            if _IGNORED_ORIGINAL.match(key):
                continue
            if not _convert_one(key, tensor, converted):
                unknown.append(f"{source_name}:{key}")
    if unknown:
        raise ValueError(
            "Unrecognised keys in the original ClipSeg/CLIP weights (not a CLIPDensePredT ViT checkpoint, or one "
            f"with options transformers' CLIPSeg cannot represent): {unknown[:12]}"
            + (f" ... ({len(unknown)} in all)" if len(unknown) > 12 else "")
        )
    return converted


def _convert_one(key: str, tensor: torch.Tensor, out: dict) -> bool:
    if key in _CLIP_TOP_LEVEL:
        new_key, transposed = _CLIP_TOP_LEVEL[key]
        out[new_key] = tensor.t().contiguous() if transposed else tensor
        return True
    for old_prefix, new_prefix in _DECODER_TOP_LEVEL_PREFIXES.items():
        if key.startswith(old_prefix):
            out[new_prefix + key[len(old_prefix):]] = tensor
            return True
    parts = _split_block_key(key, _REDUCES[0])
    if parts is not None:
        out[f"{_REDUCES[1]}{parts[0]}.{parts[1]}"] = tensor
        return True
    for old_prefix, new_prefix, block_parts, fused_qkv in _BLOCK_GROUPS:
        parts = _split_block_key(key, old_prefix)
        if parts is None:
            continue
        index, rest = parts
        layer = f"{new_prefix}{index}."
        if rest.startswith(fused_qkv):  # in_proj_weight (3D, D) / in_proj_bias (3D,) -> q, k, v in that order
            kind = rest[len(fused_qkv):]
            if kind not in ("weight", "bias") or tensor.shape[0] % 3:
                return False
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                out[f"{layer}self_attn.{name}.{kind}"] = chunk.contiguous()
            return True
        module, _, kind = rest.rpartition(".")
        if module in block_parts and kind in ("weight", "bias"):
            out[f"{layer}{block_parts[module]}.{kind}"] = tensor
            return True
        return False
    return False


def hf_clip_model_to_clipseg(clip_model_state: Mapping[str, torch.Tensor]) -> dict:
    """transformers CLIPModel keys (`vision_model.*`, `text_model.*`, projections) -> CLIPSeg `clip.*` keys."""
    converted = {}
    for key, tensor in clip_model_state.items():
        if key.endswith("position_ids"):
            continue
        converted[key if key.startswith("clip.") else f"clip.{key}"] = tensor
    return converted


def _layer_count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    indices = {int(parts[0]) for key in state if (parts := _split_block_key(key, prefix)) is not None}
    if indices != set(range(len(indices))):
        raise ValueError(f"Non-contiguous layer indices under {prefix}: {sorted(indices)}")
    return len(indices)


def infer_clipseg_config(
    hf_state: Mapping[str, torch.Tensor],
    *,
    extract_layers: Sequence[int] | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    decoder_heads: int = 4,
):
    """Build a CLIPSegConfig whose shapes match a (converted) transformers-layout state dict.

    Head counts are not recoverable from shapes: the defaults follow OpenAI CLIP (width // 64) and the original
    CLIPDensePredT (4 decoder heads). `extract_layers` defaults to CLIPDensePredT's (3, 6, 9).
    """
    from transformers import CLIPSegConfig

    def shape(key: str) -> torch.Size:
        if key not in hf_state:
            raise ValueError(f"Weights lack {key!r}; cannot build a CLIPSeg model from them.")
        return hf_state[key].shape

    patch = shape("clip.vision_model.embeddings.patch_embedding.weight")
    vision_width, num_channels, patch_size = patch[0], patch[1], patch[-1]
    grid = math.isqrt(shape("clip.vision_model.embeddings.position_embedding.weight")[0] - 1)
    vision_layers = _layer_count(hf_state, "clip.vision_model.encoder.layers.")
    text_vocab, text_width = shape("clip.text_model.embeddings.token_embedding.weight")
    text_layers = _layer_count(hf_state, "clip.text_model.encoder.layers.")
    projection_dim = shape("clip.text_projection.weight")[0]
    reduce_dim, cond_dim = shape("decoder.film_mul.weight")
    n_extract = _layer_count(hf_state, "decoder.reduces.")
    if cond_dim != projection_dim:
        raise ValueError(f"Decoder expects {cond_dim}-d conditionals but CLIP projects to {projection_dim}.")
    if extract_layers is None:
        extract_layers = (3, 6, 9)
    extract_layers = [int(i) for i in extract_layers]
    if len(extract_layers) != n_extract or max(extract_layers) >= vision_layers:
        raise ValueError(
            f"extract_layers={extract_layers} does not fit weights with {n_extract} decoder blocks and "
            f"{vision_layers} vision layers."
        )
    return CLIPSegConfig(
        text_config=dict(
            vocab_size=int(text_vocab),
            hidden_size=int(text_width),
            intermediate_size=int(shape("clip.text_model.encoder.layers.0.mlp.fc1.weight")[0]),
            num_hidden_layers=text_layers,
            num_attention_heads=int(text_heads or max(1, text_width // 64)),
            max_position_embeddings=int(shape("clip.text_model.embeddings.position_embedding.weight")[0]),
        ),
        vision_config=dict(
            hidden_size=int(vision_width),
            intermediate_size=int(shape("clip.vision_model.encoder.layers.0.mlp.fc1.weight")[0]),
            num_hidden_layers=vision_layers,
            num_attention_heads=int(vision_heads or max(1, vision_width // 64)),
            num_channels=int(num_channels),
            image_size=int(grid * patch_size),
            patch_size=int(patch_size),
        ),
        projection_dim=int(projection_dim),
        extract_layers=extract_layers,
        reduce_dim=int(reduce_dim),
        decoder_num_attention_heads=int(decoder_heads),
        decoder_intermediate_size=int(shape("decoder.layers.0.mlp.fc1.weight")[0]),
        use_complex_transposed_convolution="decoder.transposed_convolution.0.weight" in hf_state,
    )
