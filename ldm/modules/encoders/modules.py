"""Frozen text encoders used as ``cond_stage_model`` of LatentDiffusion.

* ``FrozenCLIPEmbedder``: CLIP ViT-L/14 text tower (Stable Diffusion 1.x), transformers' ``CLIPTextModel``.
* ``FrozenOpenCLIPEmbedder``: OpenCLIP ViT-H/14 text tower (Stable Diffusion 2.x), open_clip's text transformer.

Both are built from hyper-parameters only (no download): the weights come from the Stable Diffusion
checkpoint, whose ``cond_stage_model.*`` keys match our parameter names exactly once the prefix is stripped.

Both expose the same interface: ``tokenize(texts)``, ``encode_tokens(tokens, embedding_hook=None)``,
``encode(texts)`` / ``forward(texts)``, ``token_embedding``, ``max_length``, ``width``, ``pad_token_id``,
``bos_token_id``, ``eos_token_id``. ``embedding_hook(tokens, token_embeds) -> token_embeds`` sees the token
embeddings before position embeddings are added; Perfusion uses it to insert the learned concept embedding.
Gradients flow through the frozen encoder into whatever the hook inserts (no ``torch.no_grad`` here).
"""
from __future__ import annotations

import gzip
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from ldm.util import atomic_write

EmbeddingHook = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

CLIP_VIT_L14 = "openai/clip-vit-large-patch14"
# Text tower of OpenAI CLIP ViT-L/14 (the SD 1.x text encoder). Token ids follow the CLIP BPE vocabulary.
CLIP_VIT_L14_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407
_CLIP_BPE_MERGES = 49152 - 256 - 2  # merges used by CLIP's tokenizer (first line of the BPE file is a header)

# Keys found under ``cond_stage_model.`` in real checkpoints that have no parameter here, and why:
# ``position_ids`` is a constant arange buffer (non-persistent in transformers >= 4.31); some SD 1.x
# checkpoints even store it with corrupted values, so it must be dropped, never loaded.
IGNORED_CHECKPOINT_KEY_SUFFIXES = ("text_model.embeddings.position_ids",)


def clip_checkpoint_key_fixups(state_dict_keys: Iterable[str]) -> list[str]:
    """Return the keys among ``state_dict_keys`` that a loader must drop before ``load_state_dict``.

    Works with or without the ``cond_stage_model.`` prefix. For SD v1-5 checkpoints this is exactly
    ``cond_stage_model.transformer.text_model.embeddings.position_ids``; SD 2.x checkpoints need nothing dropped.
    """
    return [k for k in state_dict_keys if k.endswith(IGNORED_CHECKPOINT_KEY_SUFFIXES)]


def load_text_encoder_weights(encoder: nn.Module, state_dict: dict, prefix: str = "cond_stage_model.") -> nn.Module:
    """Load the ``prefix``-ed text encoder tensors of a Stable Diffusion state dict into ``encoder``, strictly.

    Raises a ValueError naming missing/unexpected keys (e.g. an SD 2 checkpoint given to an SD 1 encoder).
    """
    own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    for key in clip_checkpoint_key_fixups(list(own)):
        own.pop(key)
    if not own:
        raise ValueError(f"the checkpoint has no '{prefix}*' keys: it does not contain text encoder weights")
    expected = set(encoder.state_dict())
    missing, unexpected = sorted(expected - set(own)), sorted(set(own) - expected)
    if missing or unexpected:
        raise ValueError(
            f"text encoder weights do not match {type(encoder).__name__}: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). Is the checkpoint for "
            "the right Stable Diffusion version (SD 1.x = FrozenCLIPEmbedder, SD 2.x = FrozenOpenCLIPEmbedder)?"
        )
    try:
        encoder.load_state_dict(own, strict=True)
    except RuntimeError as err:  # same names, different shapes: a different model size
        raise ValueError(f"text encoder weights have the wrong shapes for {type(encoder).__name__}: {err}") from err
    return encoder


def perfusion_cache_dir() -> Path:
    """Cache folder for small generated files: ``$PERFUSION_CACHE`` or ``~/.cache/perfusion``."""
    return Path(os.environ.get("PERFUSION_CACHE") or Path.home() / ".cache" / "perfusion")


def _write_clip_tokenizer_files(folder: Path) -> None:
    """Write vocab.json/merges.txt of CLIP's BPE (the copy shipped with open_clip) so no download is needed."""
    try:
        import open_clip.tokenizer as oc_tok
    except ImportError as err:
        raise ImportError("The CLIP BPE vocabulary comes from open_clip_torch (pip install open_clip_torch), or use "
                          "a CLIP/ClipSeg folder that has its own vocab.json and merges.txt.") from err

    # Same construction as OpenAI's SimpleTokenizer: 256 byte symbols, their end-of-word forms, the first
    # 48,894 merges, then the two special tokens -> 49,408 ids.
    with gzip.open(oc_tok.default_bpe()) as fh:
        merges = fh.read().decode("utf-8").split("\n")[1 : _CLIP_BPE_MERGES + 1]
    byte_chars = list(oc_tok.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)

    def write(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))

    # The folder appears whole: concurrent processes never see half-written files.
    try:
        atomic_write(folder, write)
    except OSError:
        if not (folder / "vocab.json").is_file():
            raise
        # another process won the race; its files are identical


def clip_tokenizer_dir() -> Path:
    """A folder with CLIP's tokenizer files (``perfusion_cache_dir()/clip_tokenizer``), written on first use."""
    folder = perfusion_cache_dir() / "clip_tokenizer"
    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        _write_clip_tokenizer_files(folder)
    return folder


def build_offline_clip_tokenizer():
    """OpenAI CLIP's BPE tokenizer (transformers ``CLIPTokenizer``, ids equal to OpenAI's), built offline."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()))


def clean_caption(text: str) -> str:
    """The text normalisation of CLIP's reference tokenizer: ftfy fix, HTML unescape, whitespace, lower case."""
    from open_clip.tokenizer import basic_clean, whitespace_clean

    return whitespace_clean(basic_clean(text)).lower()


def first_eos_positions(tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B,) index of each row's first end-of-text token; the row length where a row has none (a caption cut at
    max_length). The one place that finds where a caption's words end: SD 1.x pads with EOS itself, so "is EOS"
    alone cannot tell the end token from padding."""
    is_eos = tokens == eos_token_id
    return torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(tokens[:, 0], tokens.shape[1]))


def _causal_additive_mask(length: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(1, 1, L, L) additive mask: position i attends to positions <= i (CLIP text attention is causal)."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return mask[None, None]


class _FrozenTextEncoder(nn.Module):
    """Shared behaviour: freezing, text -> encodings, token validation."""

    max_length: int
    width: int
    pad_token_id: int
    bos_token_id: int
    eos_token_id: int

    def freeze(self) -> None:
        self._frozen = True
        super().train(False)
        for param in self.parameters():
            param.requires_grad = False

    def train(self, mode: bool = True):
        # A frozen encoder stays in eval mode whatever Lightning asks of the parent module.
        return super().train(False if getattr(self, "_frozen", False) else mode)

    @property
    def token_embedding(self) -> nn.Embedding:
        raise NotImplementedError

    def tokenize(self, texts: Sequence[str] | str) -> torch.Tensor:
        raise NotImplementedError

    def text_tokens(self, text: str) -> list[str]:
        """The BPE tokens of ``text`` without BOS/EOS and without truncation (to tell what a long prompt loses)."""
        raise NotImplementedError

    def encode_tokens(self, tokens: torch.Tensor, embedding_hook: EmbeddingHook | None = None) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, texts: Sequence[str] | str) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(texts))

    def forward(self, texts: Sequence[str] | str) -> torch.Tensor:
        return self.encode(texts)

    def _embed_tokens(self, tokens: torch.Tensor, embedding_hook: EmbeddingHook | None) -> torch.Tensor:
        """Token embeddings (B, L, width) of ``tokens``, passed through ``embedding_hook``."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor (batch, length); got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.shape[1] > self.max_length:
            raise ValueError(f"token sequences are {tokens.shape[1]} long; this encoder takes at most {self.max_length}")
        vocab = self.token_embedding.num_embeddings
        if tokens.device.type != "meta" and tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab}); got range [{int(tokens.min())}, {int(tokens.max())}]")
        token_embeds = self.token_embedding(tokens)
        if embedding_hook is not None:
            hooked = embedding_hook(tokens, token_embeds)
            if not isinstance(hooked, torch.Tensor) or hooked.shape != token_embeds.shape:
                raise ValueError(
                    f"embedding_hook must return a tensor of shape {tuple(token_embeds.shape)}, "
                    f"got {getattr(hooked, 'shape', type(hooked))}"
                )
            token_embeds = hooked.to(token_embeds.dtype)  # e.g. an fp32 learned vector in an fp16 model
        return token_embeds


class _CLIPTextContainer(nn.Module):
    """Holds transformers' CLIPTextModel under the name ``text_model``.

    transformers 5 dropped the ``text_model.`` level inside CLIPTextModel; SD 1.x checkpoints still name the
    weights ``transformer.text_model.*``, so the nesting is rebuilt here instead of renaming keys at load time.
    """

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model


class FrozenCLIPEmbedder(_FrozenTextEncoder):
    """CLIP text encoder of Stable Diffusion 1.x (transformers CLIPTokenizer + CLIPTextModel).

    version: "openai/clip-vit-large-patch14" (built-in hyper-parameters, nothing downloaded), a local folder
        with config.json (and optionally weights / tokenizer files), or another hub id (needs the hub or cache).
    layer: "last" = last hidden state after the final layer norm (SD 1.x); "hidden" = hidden_states[layer_idx]
        without final norm (hidden_states[0] is the embedding output); "penultimate" = "hidden" with layer_idx=-2.
    text_config: overrides of CLIPTextConfig hyper-parameters (tiny test models).
    """

    LAYERS = ("last", "hidden", "penultimate")

    def __init__(
        self,
        version: str = CLIP_VIT_L14,
        device: str = "cpu",
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        layer_idx: int | None = None,
        text_config: dict | None = None,
    ):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer

        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got '{layer}'")
        if layer == "penultimate":
            layer, layer_idx = "hidden", -2
        self.version, self.device, self.layer, self.layer_idx = version, device, layer, layer_idx

        local = Path(version).expanduser()
        is_local = local.is_dir()
        config = self._text_config(version, local if is_local else None, text_config)
        n_layers = config.num_hidden_layers
        if layer == "hidden":
            if layer_idx is None or not -(n_layers + 1) <= layer_idx <= n_layers:
                raise ValueError(f"layer='hidden' needs layer_idx in [-{n_layers + 1}, {n_layers}], got {layer_idx}")
        if max_length > config.max_position_embeddings:
            raise ValueError(f"max_length={max_length} exceeds the {config.max_position_embeddings} position embeddings")

        has_weights = is_local and any((local / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))
        if has_weights:
            text_model = CLIPTextModel.from_pretrained(str(local), config=config)
        else:
            text_model = CLIPTextModel(config)
        self.transformer = _CLIPTextContainer(text_model)

        has_tokenizer = is_local and (
            (local / "tokenizer.json").is_file() or ((local / "vocab.json").is_file() and (local / "merges.txt").is_file())
        )
        self.tokenizer = CLIPTokenizer.from_pretrained(str(local)) if has_tokenizer else build_offline_clip_tokenizer()

        self.max_length = max_length
        self.width = config.hidden_size
        self.bos_token_id = int(self.tokenizer.bos_token_id)
        self.eos_token_id = int(self.tokenizer.eos_token_id)
        self.pad_token_id = int(self.tokenizer.pad_token_id)
        if freeze:
            self.freeze()

    @staticmethod
    def _text_config(version: str, local: Path | None, overrides: dict | None):
        from transformers import CLIPTextConfig

        overrides = dict(overrides or {})
        if local is not None:
            if not (local / "config.json").is_file():
                raise FileNotFoundError(
                    f"FrozenCLIPEmbedder(version='{version}'): the folder has no config.json. Give a folder saved with "
                    f"save_pretrained (config.json, optional weights and tokenizer) or version='{CLIP_VIT_L14}'."
                )
            return CLIPTextConfig.from_pretrained(str(local), **overrides)
        if version == CLIP_VIT_L14:
            return CLIPTextConfig(**{**CLIP_VIT_L14_TEXT_CONFIG, **overrides})
        try:
            return CLIPTextConfig.from_pretrained(version, **overrides)
        except OSError as err:
            raise OSError(
                f"FrozenCLIPEmbedder: cannot get the text config of '{version}' (offline, or not a CLIP model id). "
                f"Use version='{CLIP_VIT_L14}' (built in, no download), a local folder with config.json, or run "
                f"once with internet access so the hub cache holds it."
            ) from err

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.transformer.text_model.embeddings.token_embedding

    def tokenize(self, texts: Sequence[str] | str) -> torch.Tensor:
        """(B, max_length) ids: BOS, text, EOS, then EOS as padding (SD 1.x behaviour); long texts truncated."""
        if isinstance(texts, str):
            texts = [texts]
        batch = self.tokenizer(
            [clean_caption(t) for t in texts],
            truncation=True,
            max_length=self.max_length,
            padding="max_length",
            return_tensors="pt",
        )
        return batch["input_ids"]

    def text_tokens(self, text: str) -> list[str]:
        return self.tokenizer.tokenize(clean_caption(text))

    def encode_tokens(self, tokens: torch.Tensor, embedding_hook: EmbeddingHook | None = None) -> torch.Tensor:
        text_model = self.transformer.text_model
        tokens = tokens.to(self.token_embedding.weight.device)
        token_embeds = self._embed_tokens(tokens, embedding_hook)
        hidden = text_model.embeddings(inputs_embeds=token_embeds)  # adds position embeddings
        mask = _causal_additive_mask(hidden.shape[1], hidden.dtype, hidden.device)
        layers = text_model.encoder.layers
        # hidden_states[k] is the output after k layers (k=0: embeddings), as in transformers' output_hidden_states.
        n_run = len(layers) if self.layer == "last" else self.layer_idx % (len(layers) + 1)
        for encoder_layer in layers[:n_run]:
            hidden = encoder_layer(hidden, mask)
        if self.layer == "last":
            hidden = text_model.final_layer_norm(hidden)
        return hidden


class FrozenOpenCLIPEmbedder(_FrozenTextEncoder):
    """OpenCLIP text encoder of Stable Diffusion 2.x (no vision tower).

    arch/version: open_clip model name and pretrained tag (only fetched when ``pretrained=True``; the SD 2.x
        checkpoint already holds the text weights). model_cfg: a custom open_clip model config dict
        (``embed_dim``, ``text_cfg``, optional ``quick_gelu``) used instead of ``arch``'s (tiny test models).
    layer: "last" (all blocks) or "penultimate" (all but the last block; SD 2.x and XL).
    legacy: True (SD 2.x): ``ln_final`` is applied to the chosen layer's output; False (SD XL's ViT-bigG encoder):
        the chosen layer's output is returned as it is. ``encode_tokens_with_pooled`` also gives the pooled, projected
        embedding (SD XL's vector condition), which always runs all blocks, ``ln_final`` and ``text_projection``.
    """

    LAYERS = ("last", "penultimate")

    def __init__(
        self,
        arch: str = "ViT-H-14",
        version: str = "laion2b_s32b_b79k",
        device: str = "cpu",
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "penultimate",
        model_cfg: dict | None = None,
        pretrained: bool = False,
        legacy: bool = True,
    ):
        super().__init__()
        import open_clip
        from open_clip.model import _build_text_tower

        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got '{layer}'")
        self.arch, self.version, self.device, self.layer = arch, version, device, layer
        self.layer_idx = 0 if layer == "last" else 1  # number of final blocks skipped
        self.legacy = legacy

        cfg = model_cfg if model_cfg is not None else open_clip.get_model_config(arch)
        if cfg is None:
            raise ValueError(f"unknown open_clip architecture '{arch}'; known: {', '.join(open_clip.list_models())}")
        text_cfg = dict(cfg["text_cfg"])
        if text_cfg.get("hf_model_name"):
            raise ValueError(f"'{arch}' uses a Hugging Face text tower; only open_clip's own TextTransformer is supported")
        if max_length > text_cfg.get("context_length", 77):
            raise ValueError(f"max_length={max_length} exceeds the model's context_length {text_cfg.get('context_length', 77)}")

        # Text tower only: same modules/names as open_clip.CLIP's text attributes (token_embedding,
        # positional_embedding, transformer, ln_final, text_projection), plus logit_scale, which SD 2.x
        # checkpoints keep under cond_stage_model.model.logit_scale.
        self.model = _build_text_tower(cfg["embed_dim"], text_cfg, quick_gelu=cfg.get("quick_gelu", False))
        self.model.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        if self.model.attn_mask is None:
            raise ValueError("SD 2.x needs a causal text tower; this model_cfg sets no_causal_mask")
        if self.layer_idx >= len(self.model.transformer.resblocks):
            raise ValueError("layer='penultimate' needs at least 2 transformer blocks")
        if pretrained:
            self._load_open_clip_pretrained(arch, version)

        self.max_length = max_length
        self.width = self.model.width
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, CLIP_BOS_ID, CLIP_EOS_ID
        if freeze:
            self.freeze()

    def _load_open_clip_pretrained(self, arch: str, version: str) -> None:
        import open_clip

        try:
            full = open_clip.create_model(arch, pretrained=version, device="cpu")
        except Exception as err:  # open_clip raises various errors when offline / tag unknown
            raise RuntimeError(
                f"FrozenOpenCLIPEmbedder: could not fetch open_clip weights '{arch}' / '{version}' ({err}). Use "
                "pretrained=False and load the text encoder from the Stable Diffusion 2.x checkpoint instead."
            ) from err
        text_state = {k: v for k, v in full.state_dict().items() if not k.startswith("visual.")}
        text_state.pop("logit_bias", None)
        self.model.load_state_dict(text_state, strict=True)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.model.token_embedding

    def unused_weight_names(self) -> list[str]:
        """State-dict names of weights ``encode`` never reads: the text projection and logit scale (CLIP's
        contrastive head) and the blocks after the chosen layer. diffusers' SD 2.x text encoders lack them."""
        blocks = len(self.model.transformer.resblocks)
        skipped = [f"model.transformer.resblocks.{i}." for i in range(blocks - self.layer_idx, blocks)]
        return ["model.text_projection", "model.logit_scale",
                *[name for name in self.state_dict() if name.startswith(tuple(skipped))]]

    def tokenize(self, texts: Sequence[str] | str) -> torch.Tensor:
        """(B, max_length) ids from open_clip's tokenizer: BOS, text, EOS, then zeros."""
        import open_clip

        if isinstance(texts, str):
            texts = [texts]
        return open_clip.tokenize(list(texts), context_length=self.max_length)

    def text_tokens(self, text: str) -> list[str]:
        from open_clip.tokenizer import _tokenizer

        return [_tokenizer.decoder[i] for i in _tokenizer.encode(text)]

    def _hidden_states(self, tokens: torch.Tensor, embedding_hook: EmbeddingHook | None, n_blocks: int
                       ) -> list[torch.Tensor]:
        """Outputs (batch first) after ``len(blocks) - k`` blocks for k = layer_idx and, when n_blocks runs
        further, after all ``n_blocks``: [chosen layer, last run layer] (one entry when they coincide)."""
        model = self.model
        tokens = tokens.to(self.token_embedding.weight.device)
        x = self._embed_tokens(tokens, embedding_hook)
        length = x.shape[1]
        x = x + model.positional_embedding[:length].to(x.dtype)
        attn_mask = model.attn_mask[:length, :length].to(x.dtype)
        seq_first = not getattr(model.transformer, "batch_first", True)
        if seq_first:
            x = x.transpose(0, 1)
        blocks = model.transformer.resblocks
        chosen = len(blocks) - self.layer_idx
        outputs = []
        for i, block in enumerate(blocks[:n_blocks]):
            x = block(x, attn_mask=attn_mask)
            if i + 1 == chosen or i + 1 == n_blocks:
                outputs.append(x.transpose(0, 1) if seq_first else x)
        return outputs

    def encode_tokens(self, tokens: torch.Tensor, embedding_hook: EmbeddingHook | None = None) -> torch.Tensor:
        blocks = len(self.model.transformer.resblocks)
        x = self._hidden_states(tokens, embedding_hook, blocks - self.layer_idx)[0]
        return self.model.ln_final(x) if self.legacy else x

    def encode_tokens_with_pooled(self, tokens: torch.Tensor, embedding_hook: EmbeddingHook | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states of ``layer`` as ``encode_tokens`` gives them, pooled embedding): the pooled embedding is
        the final (``ln_final``-normed) state at each sequence's end-of-text token (its largest id, as in CLIP),
        times ``text_projection``: open_clip's text features, SD XL's pooled text condition."""
        model = self.model
        outputs = self._hidden_states(tokens, embedding_hook, len(model.transformer.resblocks))
        hidden = model.ln_final(outputs[0]) if self.legacy else outputs[0]
        last = model.ln_final(outputs[-1])
        eos = tokens.to(last.device).argmax(dim=-1)
        pooled = last[torch.arange(last.shape[0], device=last.device), eos]
        projection = model.text_projection
        pooled = projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection.to(pooled.dtype)
        return hidden, pooled
