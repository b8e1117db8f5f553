"""Tiny configurations of the real text encoder classes, for tests (random weights, CPU)."""
from __future__ import annotations

import torch

from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder

TINY_CLIP_TEXT_CONFIG = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
TINY_OPENCLIP_MODEL_CFG = dict(
    embed_dim=32,
    text_cfg=dict(width=32, heads=4, layers=3, context_length=77, vocab_size=49408),
)


def randomize_layer_norms(module: torch.nn.Module) -> torch.nn.Module:
    """Give every LayerNorm a trained-looking affine (weight ~ 1 +- 0.2, bias ~ +-0.2).

    At their default init (weight 1, bias 0) final-LayerNorm outputs all have zero feature mean, so their
    uncentered covariance is exactly singular; trained encoders do not have that degeneracy.
    """
    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, torch.nn.LayerNorm):
                norm.weight.copy_(1 + 0.2 * torch.randn_like(norm.weight))
                norm.bias.copy_(0.2 * torch.randn_like(norm.bias))
    return module


def tiny_clip(seed: int = 0, **kwargs) -> FrozenCLIPEmbedder:
    torch.manual_seed(seed)
    return randomize_layer_norms(FrozenCLIPEmbedder(text_config=dict(TINY_CLIP_TEXT_CONFIG), **kwargs))


def tiny_openclip(seed: int = 0, **kwargs) -> FrozenOpenCLIPEmbedder:
    torch.manual_seed(seed)
    return randomize_layer_norms(FrozenOpenCLIPEmbedder(model_cfg=dict(TINY_OPENCLIP_MODEL_CFG), **kwargs))
