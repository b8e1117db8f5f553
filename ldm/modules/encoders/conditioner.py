"""The conditioning stage of Stable Diffusion XL: two text encoders and the size/crop conditioning.

``SDXLConditioner.embedders`` holds, in the order (and so with the checkpoint names) of ``sd_xl_base_1.0``:

0. CLIP ViT-L/14 (``FrozenCLIPEmbedder``, hidden state after 11 of 12 layers, no final norm): 77 x 768;
1. OpenCLIP ViT-bigG/14 (``FrozenOpenCLIPEmbedder``, ``legacy=False``): penultimate hidden state 77 x 1280, and the
   pooled, projected text embedding (1280);
2.-4. ``SizeEmbedder`` of ``original_size_as_tuple``, ``crop_coords_top_left``, ``target_size_as_tuple`` (each two
   numbers, height/top first, embedded with 256-dim sinusoidal timestep embeddings: 3 x 2 x 256 = 1536).

``encode`` returns ``{"crossattn": (B, 77, 768 + 1280), "vector": (B, 1280 + 1536)}``: the UNet's cross-attention
context and its vector condition ``y`` (``adm_in_channels`` = 2816). The keys ``crossattn``/``vector`` are those of
the original code; the samplers batch such dicts key by key for classifier-free guidance.

Token-level interface (Perfusion, C^-1 estimation): the two tokenizers share CLIP's BPE vocabulary and differ only
in their padding (CLIP pads with its end token, OpenCLIP with 0), so one (B, 77) grid of CLIP ids serves both
(``tokenize``); ``encode_tokens`` derives OpenCLIP's ids from it and returns the 2048-wide context, and
``encode_tokens_to_cond`` the full conditioning. A placeholder token thus stands at the same position for both
encoders, and its 2048-wide encoding is the concatenation of the two encoders' states there.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Sequence

import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.modules.encoders.modules import EmbeddingHook
from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, first_eos_positions

SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
TEXT_KEY = "txt"


class SizeEmbedder(nn.Module):
    """(B, D) numbers -> (B, D * dim): each number gets the sinusoidal timestep embedding [cos | sin] of width dim.
    No parameters (the learned part is the UNet's ``label_emb``)."""

    def __init__(self, dim: int = 256):
        super().__init__()
        self.dim = dim

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if values.dim() != 2:
            raise ValueError(f"size conditioning must be (batch, numbers), got shape {tuple(values.shape)}")
        batch = values.shape[0]
        return timestep_embedding(values.reshape(-1), self.dim).reshape(batch, -1)


class SDXLConditioner(nn.Module):
    """SD XL's text + size conditioning (see the module docstring).

    clip_params / open_clip_params: keyword arguments of the two encoders over SD XL's defaults (tiny test models
        give ``text_config`` / ``model_cfg`` here). size_embed_dim: width of each number's embedding.
    original_size / crop_coords_top_left / target_size: (height, width), (top, left) used when ``encode`` is given
        prompts only (SD XL base: 1024 x 1024 images, no crop).
    """

    def __init__(self, clip_params: Mapping[str, Any] | None = None, open_clip_params: Mapping[str, Any] | None = None,
                 size_embed_dim: int = 256, original_size: Sequence[int] = (1024, 1024),
                 crop_coords_top_left: Sequence[int] = (0, 0), target_size: Sequence[int] = (1024, 1024)):
        super().__init__()
        clip = FrozenCLIPEmbedder(**{"layer": "hidden", "layer_idx": 11, **dict(clip_params or {})})
        open_clip = FrozenOpenCLIPEmbedder(**{"arch": "ViT-bigG-14", "version": "laion2b_s39b_b160k",
                                              "layer": "penultimate", "legacy": False,
                                              **dict(open_clip_params or {})})
        if open_clip.legacy:
            raise ValueError("SD XL's OpenCLIP encoder returns its hidden states without ln_final: legacy=False")
        self.embedders = nn.ModuleList([clip, open_clip, *(SizeEmbedder(size_embed_dim) for _ in SIZE_KEYS)])
        self.default_sizes = {key: tuple(int(v) for v in value) for key, value in
                              zip(SIZE_KEYS, (original_size, crop_coords_top_left, target_size))}
        for key, value in self.default_sizes.items():
            if len(value) != 2:
                raise ValueError(f"{key} must be two numbers, got {value}")
        self.context_dim = clip.width + open_clip.width
        self.pooled_dim = int(open_clip.model.text_projection.shape[-1])
        self.vector_dim = self.pooled_dim + len(SIZE_KEYS) * 2 * size_embed_dim

    @property
    def text_encoders(self) -> tuple[FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder]:
        return self.embedders[0], self.embedders[1]

    # ----- token-level interface (module docstring): the same attributes as the single text encoders ----------------
    @property
    def width(self) -> int:
        """Width of the cross-attention context (768 + 1280 = 2048 for SD XL)."""
        return self.context_dim

    @property
    def max_length(self) -> int:
        return self.embedders[0].max_length

    @property
    def bos_token_id(self) -> int:
        return self.embedders[0].bos_token_id

    @property
    def eos_token_id(self) -> int:
        return self.embedders[0].eos_token_id

    @property
    def pad_token_id(self) -> int:
        return self.embedders[0].pad_token_id

    @property
    def version(self) -> str:
        clip, open_clip = self.text_encoders
        return f"{clip.version}+{open_clip.arch}"

    def tokenize(self, texts: Sequence[str] | str) -> torch.Tensor:
        """(B, max_length) CLIP ids (BOS, text, EOS, EOS as padding); OpenCLIP's are derived by ``open_clip_tokens``."""
        return self.embedders[0].tokenize(texts)

    def text_tokens(self, text: str) -> list[str]:
        return self.embedders[0].text_tokens(text)

    def open_clip_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """OpenCLIP's ids for CLIP's ``tokens``: the same ids through the first end token, 0 after it."""
        position = torch.arange(tokens.shape[1], device=tokens.device)[None]
        after_eos = position > first_eos_positions(tokens, self.eos_token_id)[:, None]
        return tokens.masked_fill(after_eos, self.embedders[1].pad_token_id)

    @staticmethod
    def _hooks(embedding_hook) -> tuple:
        """One embedding hook per text encoder: an object with ``encoder_hooks`` (two hooks, CLIP's and OpenCLIP's;
        perfusion.embedding_manager.SDXLEmbeddingManager), or one hook for both, or None."""
        hooks = getattr(embedding_hook, "encoder_hooks", None)
        if hooks is None:
            return embedding_hook, embedding_hook
        hooks = tuple(hooks)
        if len(hooks) != 2:
            raise ValueError(f"SD XL has two text encoders; encoder_hooks gives {len(hooks)} hooks")
        return hooks

    def _encode_tokens(self, tokens: torch.Tensor, embedding_hook, with_pooled: bool):
        clip, open_clip = self.text_encoders
        hook_clip, hook_open = self._hooks(embedding_hook)
        crossattn_clip = clip.encode_tokens(tokens, embedding_hook=hook_clip)
        open_tokens = self.open_clip_tokens(tokens)
        if with_pooled:
            crossattn_open, pooled = open_clip.encode_tokens_with_pooled(open_tokens, embedding_hook=hook_open)
        else:
            crossattn_open, pooled = open_clip.encode_tokens(open_tokens, embedding_hook=hook_open), None
        return torch.cat([crossattn_clip, crossattn_open.to(crossattn_clip.dtype)], dim=-1), pooled

    def encode_tokens(self, tokens: torch.Tensor, embedding_hook: EmbeddingHook | None = None) -> torch.Tensor:
        """CLIP ids (B, L) -> the cross-attention context (B, L, 2048), the encoders' hidden states concatenated.
        ``embedding_hook``: see ``_hooks``."""
        return self._encode_tokens(tokens, embedding_hook, with_pooled=False)[0]

    def encode_tokens_to_cond(self, tokens: torch.Tensor, embedding_hook: EmbeddingHook | None = None,
                              sizes: Mapping[str, Any] | None = None, force_zero_text: bool = False
                              ) -> dict[str, torch.Tensor]:
        """CLIP ids (B, L) -> ``{"crossattn", "vector"}`` as ``encode`` gives them; ``sizes``: the size keys
        (``SIZE_KEYS``, two numbers or (B, 2)), each defaulting to the conditioner's."""
        crossattn, pooled = self._encode_tokens(tokens, embedding_hook, with_pooled=True)
        return self._conditioning(crossattn, pooled, sizes or {}, force_zero_text)

    def _conditioning(self, crossattn, pooled, batch, force_zero_text: bool) -> dict[str, torch.Tensor]:
        if force_zero_text:
            crossattn, pooled = torch.zeros_like(crossattn), torch.zeros_like(pooled)
        sizes = [embedder(value).to(pooled.dtype) for embedder, value in
                 zip(self.embedders[2:], self._sizes(batch, crossattn.shape[0], pooled.device))]
        return {"crossattn": crossattn, "vector": torch.cat([pooled, *sizes], dim=-1)}

    def train(self, mode: bool = True):
        return super().train(False)  # frozen, as the text encoders themselves

    def _sizes(self, batch: Mapping[str, Any], n: int, device) -> list[torch.Tensor]:
        sizes = []
        for key in SIZE_KEYS:
            value = batch.get(key, self.default_sizes[key])
            value = torch.as_tensor(value, dtype=torch.float32, device=device)
            if value.dim() == 1:
                value = value.expand(n, -1)
            if value.shape != (n, 2):
                raise ValueError(f"{key} must be 2 numbers or ({n}, 2), got shape {tuple(value.shape)}")
            sizes.append(value)
        return sizes

    def encode(self, batch: Mapping[str, Any] | Sequence[str] | str, force_zero_text: bool = False
               ) -> dict[str, torch.Tensor]:
        """Prompts (str or list) or a dict with ``txt`` and optionally the size keys (two numbers, or (B, 2)) ->
        ``{"crossattn", "vector"}``. ``force_zero_text``: the text parts are zeros (SD XL's unconditional input for
        an empty negative prompt, diffusers' ``force_zeros_for_empty_prompt``); the size parts stay."""
        if isinstance(batch, str) or not isinstance(batch, Mapping):
            batch = {TEXT_KEY: batch}
        texts = batch[TEXT_KEY]
        texts = [texts] if isinstance(texts, str) else list(texts)
        clip, open_clip = self.text_encoders
        crossattn_clip = clip.encode(texts)
        crossattn_open, pooled = open_clip.encode_tokens_with_pooled(open_clip.tokenize(texts))
        crossattn = torch.cat([crossattn_clip, crossattn_open.to(crossattn_clip.dtype)], dim=-1)
        return self._conditioning(crossattn, pooled, batch, force_zero_text)

    def forward(self, batch, force_zero_text: bool = False) -> dict[str, torch.Tensor]:
        return self.encode(batch, force_zero_text=force_zero_text)
