"""Transformer blocks of the Stable Diffusion UNet.

``CrossAttention.to_k`` / ``to_v`` are plain modules called as ``to_k(context)``: Perfusion swaps them for
rank-one-edit layers after the checkpoint has loaded, without the UNet knowing.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldm.modules.diffusionmodules.util import checkpoint, zero_module

# Upcast attention to float32 under half precision: SD 2.x overflows in fp16 otherwise.
ATTENTION_UPCAST = True


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = True, dropout: float = 0.0):
        super().__init__()
        inner = int(dim * mult)
        dim_out = dim_out or dim
        project_in = GEGLU(dim, inner) if glu else nn.Sequential(nn.Linear(dim, inner), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner, dim_out))

    def forward(self, x):
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention; cross-attention when built with ``context_dim`` (``is_cross_attention``)."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0, upcast: bool | None = None):
        super().__init__()
        inner = heads * dim_head
        self.is_cross_attention = context_dim is not None
        context_dim = context_dim if context_dim is not None else query_dim
        self.heads = heads
        self.dim_head = dim_head
        self.upcast = ATTENTION_UPCAST if upcast is None else upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None, mask=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        if mask is not None:
            mask = rearrange(mask, "b j -> b 1 1 j").bool()
        dtype = q.dtype
        if self.upcast and dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        if q.device.type == "cpu":  # torch's CPU flash kernel is several times slower at these head sizes
            with sdpa_kernel(SDPBackend.MATH):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).to(dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).to(dtype)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: int | None = None,
                 gated_ff: bool = True, checkpoint: bool = False, disable_self_attn: bool = False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x, context=None):
        return checkpoint(self._forward, (x, context), self.checkpoint)

    def _forward(self, x, context=None):
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of an image feature map, conditioned on a context sequence."""

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim=None, disable_self_attn: bool = False, use_linear: bool = False,
                 use_checkpoint: bool = False):
        super().__init__()
        if isinstance(context_dim, (list, tuple)):
            context_dim = context_dim[0]
        inner = n_heads * d_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, n_heads, d_head, dropout, context_dim,
                                  checkpoint=use_checkpoint, disable_self_attn=disable_self_attn)
            for _ in range(depth)
        )
        if use_linear:
            self.proj_out = zero_module(nn.Linear(inner, in_channels))
        else:
            self.proj_out = zero_module(nn.Conv2d(inner, in_channels, kernel_size=1))

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = rearrange(x, "b c h w -> b (h w) c").contiguous()
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context=context)
        if self.use_linear:
            x = self.proj_out(x)
        x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w).contiguous()
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in
