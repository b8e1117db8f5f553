"""Tiny random ClipSeg models (same classes as the real ones) shared by the ClipSeg tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

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
