"""The Stable Diffusion UNet (SD 1.x, 2.x and XL configurations), parameter names as in the original checkpoints."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as second argument."""

    def forward(self, x, emb):  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that routes the timestep embedding to ResBlocks and the context to transformers."""

    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding=1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=padding)

    def forward(self, x):
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding=1):
        super().__init__()
        self.out_channels = out_channels or channels
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            assert channels == self.out_channels
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, dims: int = 2,
                 use_checkpoint: bool = False):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        return checkpoint(self._forward, (x, emb), self.use_checkpoint)

    def _forward(self, x, emb):
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while emb_out.dim() < h.dim():
            emb_out = emb_out[..., None]
        if self.use_scale_shift_norm:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class UNetModel(nn.Module):
    """Conditional UNet of latent diffusion.

    SD 1.x: ``num_heads=8``, convolutional proj_in/out. SD 2.x: ``num_head_channels=64``,
    ``use_linear_in_transformer=True``. SD XL: as SD 2.x, plus per-level ``transformer_depth`` (e.g. [0, 2, 10] or
    [1, 2, 10] with ``attention_resolutions: [4, 2]``: no attention at the first level) and a vector condition
    ``y`` (``num_classes: sequential``, ``adm_in_channels``: pooled text embedding + size embeddings) added to the
    timestep embedding through ``label_emb``. Cross-attention context enters through ``context``.
    """

    # Keys of the original UNet configs that this implementation does not use (accepted with a warning).
    UNUSED_CONFIG_KEYS = {
        "num_heads_upsample": "it only concerns the non-spatial AttentionBlock, which SD does not use",
        "use_new_attention_order": "it only concerns the non-spatial AttentionBlock, which SD does not use",
        "spatial_transformer_attn_type": "attention always runs through torch's scaled_dot_product_attention",
    }

    def __init__(self, image_size, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int | Sequence[int], attention_resolutions: Sequence[int], dropout: float = 0.0,
                 channel_mult: Sequence[int] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 num_classes=None, use_checkpoint: bool = False, use_fp16: bool = False, num_heads: int = -1,
                 num_head_channels: int = -1, use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_spatial_transformer: bool = True, transformer_depth: int | Sequence[int] = 1,
                 context_dim: int | None = None, n_embed=None, legacy: bool = True,
                 disable_self_attentions=None, num_attention_blocks=None, disable_middle_self_attn: bool = False,
                 use_linear_in_transformer: bool = False, adm_in_channels: int | None = None):
        super().__init__()
        if not use_spatial_transformer or context_dim is None:
            raise ValueError("this UNet is the text-conditioned Stable Diffusion UNet: set use_spatial_transformer "
                             "and context_dim")
        if num_classes not in (None, "sequential"):
            raise NotImplementedError(f"num_classes={num_classes!r}: only 'sequential' (SD XL's vector condition, "
                                      "with adm_in_channels) is supported; class-label UNets are not Stable Diffusion")
        if (num_classes == "sequential") != (adm_in_channels is not None):
            raise ValueError("num_classes: sequential and adm_in_channels go together (SD XL's vector condition)")
        if resblock_updown or n_embed is not None or num_attention_blocks is not None:
            raise NotImplementedError("resblock up/down, codebook and partial-attention UNets are not part of "
                                      "Stable Diffusion 1.x/2.x/XL")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels")
        if isinstance(num_res_blocks, int):
            num_res_blocks = [num_res_blocks] * len(channel_mult)
        if isinstance(transformer_depth, int):
            transformer_depth = [transformer_depth] * len(channel_mult)
        disable_self_attentions = disable_self_attentions or [False] * len(channel_mult)
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.dtype = torch.float16 if use_fp16 else None  # None: run in the input's precision
        time_embed_dim = model_channels * 4

        def heads_for(ch):  # SD 1.x fixes the head count, SD 2.x the head width
            if num_head_channels == -1:
                return num_heads, ch // num_heads
            return ch // num_head_channels, num_head_channels

        def transformer(ch, depth, disable_self_attn):
            heads, dim_head = heads_for(ch)
            return SpatialTransformer(ch, heads, dim_head, depth=depth, dropout=dropout, context_dim=context_dim,
                                      disable_self_attn=disable_self_attn, use_linear=use_linear_in_transformer,
                                      use_checkpoint=use_checkpoint)

        def resblock(ch_in, ch_out):
            return ResBlock(ch_in, time_embed_dim, dropout, out_channels=ch_out, dims=dims,
                            use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm)

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if num_classes == "sequential":  # SD XL: the vector condition y joins the timestep embedding
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(adm_in_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)))
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3,
                                                                           padding=1))])
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks[level]):
                layers = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch, transformer_depth[level], disable_self_attentions[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample, dims=dims,
                                                                            out_channels=ch)))
                skip_channels.append(ch)
                ds *= 2
        heads, dim_head = heads_for(ch)
        self.middle_block = TimestepEmbedSequential(
            resblock(ch, ch),
            SpatialTransformer(ch, heads, dim_head, depth=transformer_depth[-1], dropout=dropout,
                               context_dim=context_dim, disable_self_attn=disable_middle_self_attn,
                               use_linear=use_linear_in_transformer, use_checkpoint=use_checkpoint),
            resblock(ch, ch),
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks[level] + 1):
                layers = [resblock(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch, transformer_depth[level], disable_self_attentions[level]))
                if level and i == num_res_blocks[level]:
                    layers.append(Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1))
        )

    def forward(self, x, timesteps, context=None, y=None, **kwargs):
        if kwargs:
            raise TypeError(f"unexpected UNet arguments: {sorted(kwargs)}")
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("y (the vector condition) must be given exactly when the UNet has num_classes set "
                             f"(num_classes={self.num_classes!r}, y given: {y is not None})")
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if y is not None:
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"y has batch {y.shape[0]}, x has {x.shape[0]}")
            emb = emb + self.label_emb(y.to(emb.dtype))
        h = x if self.dtype is None else x.type(self.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h.type(x.dtype))
