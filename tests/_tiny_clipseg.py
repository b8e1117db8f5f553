"""Tiny random ClipSeg models (same classes as the real ones) shared by the ClipSeg tests."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from clipseg.convert import _BLOCK_GROUPS, _CLIP_TOP_LEVEL, _DECODER_TOP_LEVEL_PREFIXES, _REDUCES, _split_block_key

TINY_EXTRACT_LAYERS = [0, 2]
TINY_HEADS = 2  # vision, text and decoder heads (not recoverable from weight shapes)
TINY_IMAGE_SIZE = 64  # the vision tower's native size; the masker may run it at another multiple of 16


def tiny_clipseg_config():
    from transformers import CLIPSegConfig

    return CLIPSegConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=TINY_HEADS, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=TINY_HEADS, image_size=TINY_IMAGE_SIZE, patch_size=16),
        projection_dim=16, extract_layers=TINY_EXTRACT_LAYERS, reduce_dim=16,
        decoder_num_attention_heads=TINY_HEADS, decoder_intermediate_size=32,
        use_complex_transposed_convolution=True,  # like rd64-uni-refined
    )


def tiny_clipseg_model(seed: int = 0):
    """Random tiny CLIPSegForImageSegmentation; every tensor perturbed so zero/one inits hide no mapping error."""
    from transformers import CLIPSegForImageSegmentation

    torch.manual_seed(seed)
    model = CLIPSegForImageSegmentation(tiny_clipseg_config()).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def save_tiny_clipseg_folder(model, folder: Path, image_size: int = 96) -> Path:
    """A transformers folder like CIDAS/clipseg-rd64-refined, minus tokenizer files (built offline instead)."""
    model.save_pretrained(folder)
    preprocessor = {"do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
                    "size": {"height": image_size, "width": image_size}}
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return Path(folder)


def tiny_open_clip(seed: int = 1):
    """An open_clip CLIP (OpenAI parameter layout, QuickGELU) shaped like the tiny ClipSeg backbone."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=3, width=32, head_width=32 // TINY_HEADS, patch_size=16,
                                 image_size=TINY_IMAGE_SIZE, mlp_ratio=2),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=TINY_HEADS, layers=2, mlp_ratio=2),
        quick_gelu=True,
    ).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


class OriginalDecoder(nn.Module):
    """The original CLIPDensePredT decoder modules (refined variant) built from torch layers, for reference."""

    def __init__(self, reduce_dim: int = 16, cond_dim: int = 16, vision_width: int = 32, seed: int = 2):
        super().__init__()
        torch.manual_seed(seed)
        depth = len(TINY_EXTRACT_LAYERS)
        self.film_mul = nn.Linear(cond_dim, reduce_dim)
        self.film_add = nn.Linear(cond_dim, reduce_dim)
        self.reduce = nn.Linear(vision_width, reduce_dim)  # exists in the original, unused by its forward
        self.reduces = nn.ModuleList([nn.Linear(vision_width, reduce_dim) for _ in range(depth)])
        self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(d_model=reduce_dim, nhead=TINY_HEADS,
                                                                dim_feedforward=32) for _ in range(depth)])
        self.trans_conv = nn.Sequential(
            nn.Conv2d(reduce_dim, reduce_dim, kernel_size=3, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(reduce_dim, reduce_dim // 2, kernel_size=4, stride=4), nn.ReLU(),
            nn.ConvTranspose2d(reduce_dim // 2, 1, kernel_size=4, stride=4),
        )
        self.eval()
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.05)

    def forward(self, activations: list[torch.Tensor], cond: torch.Tensor) -> torch.Tensor:
        """activations: sequence-first (L, B, D) outputs of the extracted CLIP layers, shallow to deep."""
        a = None
        for i, (activation, block, reduce) in enumerate(zip(activations[::-1], self.blocks, self.reduces)):
            a = reduce(activation) if a is None else reduce(activation) + a
            if i == 0:  # cond_layer = 0: FiLM before the first block
                a = self.film_mul(cond) * a + self.film_add(cond)
            a = block(a)
        a = a[1:].permute(1, 2, 0)  # drop CLS -> (B, D, tokens)
        size = int(a.shape[2] ** 0.5)
        return self.trans_conv(a.reshape(a.shape[0], a.shape[1], size, size))[:, 0]


# ----- the inverse key mapping (transformers -> original layout), used only by the tests -----------------------
def hf_to_original(hf_state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """Inverse of `original_to_hf`: transformers CLIPSeg state dict -> (OpenAI CLIP dict, original decoder dict).

    Tests use it to check the mapping both ways and to write weights in the original layout.
    """
    clip_state: dict[str, torch.Tensor] = {}
    decoder_state: dict[str, torch.Tensor] = {}
    inverse_top = {new: (old, transposed) for old, (new, transposed) in _CLIP_TOP_LEVEL.items()}
    qkv_parts: dict[str, dict[str, torch.Tensor]] = {}  # fused original key -> {"q": .., "k": .., "v": ..}
    unknown: list[str] = []
    for key, tensor in hf_state.items():
        if key.endswith("position_ids"):  # non-persistent index buffers, not weights
            continue
        if key in inverse_top:
            old, transposed = inverse_top[key]
            clip_state[old] = tensor.t().contiguous() if transposed else tensor
            continue
        top = next((old for old, new in _DECODER_TOP_LEVEL_PREFIXES.items() if key.startswith(new)), None)
        if top is not None:
            decoder_state[top + key[len(_DECODER_TOP_LEVEL_PREFIXES[top]):]] = tensor
            continue
        parts = _split_block_key(key, _REDUCES[1])
        if parts is not None:
            decoder_state[f"{_REDUCES[0]}{parts[0]}.{parts[1]}"] = tensor
            continue
        if not _invert_block_key(key, tensor, clip_state, decoder_state, qkv_parts):
            unknown.append(key)
    for fused_key, parts in qkv_parts.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"Incomplete q/k/v projections for {fused_key}: have {sorted(parts)}")
        target = decoder_state if fused_key.startswith("blocks.") else clip_state
        target[fused_key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if unknown:
        raise ValueError(f"transformers CLIPSeg keys without an original counterpart: {unknown[:12]}")
    return clip_state, decoder_state


def _invert_block_key(key, tensor, clip_state, decoder_state, qkv_parts) -> bool:
    for old_prefix, new_prefix, block_parts, fused_qkv in _BLOCK_GROUPS:
        parts = _split_block_key(key, new_prefix)
        if parts is None:
            continue
        index, rest = parts
        qkv = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if qkv:
            qkv_parts.setdefault(f"{old_prefix}{index}.{fused_qkv}{qkv.group(2)}", {})[qkv.group(1)] = tensor
            return True
        module, _, kind = rest.rpartition(".")
        inverse_parts = {new: old for old, new in block_parts.items()}
        if module not in inverse_parts:
            return False
        target = decoder_state if old_prefix == "blocks." else clip_state
        target[f"{old_prefix}{index}.{inverse_parts[module]}.{kind}"] = tensor
        return True
    return False
