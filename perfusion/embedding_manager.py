"""Learned word embeddings for placeholder strings (Textual-Inversion style), inserted into the text encoder.

Works with any encoder that exposes ``tokenize``, ``encode_tokens(tokens, embedding_hook)`` and
``token_embedding`` (our ``FrozenCLIPEmbedder`` and ``FrozenOpenCLIPEmbedder``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ldm.util import BadValueError


class PlaceholderError(BadValueError):
    """A placeholder or initializer word that the tokenizer does not see as exactly one token."""


def word_token_ids(encoder, word: str) -> list[int]:
    """The token ids the encoder's tokenizer makes of ``word`` alone (no start/end tokens)."""
    with torch.device("cpu"):  # token ids are data, also when the model is built on the meta device
        tokens = encoder.tokenize([word])[0].tolist()
    body = []
    for token in tokens[1:]:
        if token == encoder.eos_token_id:
            break
        body.append(token)
    return body


def single_token_id(encoder, word: str, role: str) -> int:
    """The id of ``word`` if the encoder's tokenizer makes it exactly one token, else a clear error."""
    body = word_token_ids(encoder, word)
    specials = {encoder.bos_token_id, encoder.eos_token_id, encoder.pad_token_id}
    if len(body) != 1 or body[0] in specials:
        raise PlaceholderError(
            f"{role} '{word}' is {len(body)} tokens for this text encoder; it must be exactly one. "
            + ("Pick a rare single-token string such as '*' or 'sks'." if role == "placeholder" else
               "Pick a common one-token word for the super-class (e.g. 'teddy', 'cat', 'dog', 'toy', 'person').")
        )
    return body[0]


def superclass_token_ids(encoder, word: str) -> list[int]:
    """The one or more token ids of a super-class word (e.g. 'birdbath' -> 'bird', 'bath'); a clear error for a
    word that makes no token or contains a special token."""
    body = word_token_ids(encoder, word)
    specials = {encoder.bos_token_id, encoder.eos_token_id, encoder.pad_token_id}
    if not body or any(token in specials for token in body) or len(word.split()) != 1:
        raise PlaceholderError(f"initializer word '{word}' must be one word that the tokenizer reads as one or more "
                               "ordinary tokens (e.g. 'teddy', 'birdbath')")
    return body


class EmbeddingManager(nn.Module):
    """One learned embedding per placeholder string, initialised from its super-class (initializer) word."""

    UNUSED_CONFIG_KEYS = {
        "progressive_words": "Perfusion learns one vector per concept word",
        "per_image_tokens": "Perfusion learns one vector per concept, not one per image",
    }

    def __init__(self, embedder, placeholder_strings: Sequence[str] = ("*",),
                 initializer_words: Sequence[str] = (), num_vectors_per_token: int = 1):
        super().__init__()
        if num_vectors_per_token != 1:
            raise BadValueError("Perfusion learns one vector per concept word: num_vectors_per_token must be 1")
        placeholder_strings = list(placeholder_strings)
        initializer_words = list(initializer_words)
        if initializer_words and len(initializer_words) != len(placeholder_strings):
            raise BadValueError(f"{len(placeholder_strings)} placeholder strings but {len(initializer_words)} "
                             "initializer words; give one super-class word per placeholder")
        if len(set(placeholder_strings)) != len(placeholder_strings):
            raise BadValueError(f"placeholder strings must differ, got {placeholder_strings}")
        self.placeholder_strings = placeholder_strings
        self.initializer_words = initializer_words
        ids = [single_token_id(embedder, p, "placeholder") for p in placeholder_strings]
        self.register_buffer("placeholder_token_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        table = embedder.token_embedding.weight
        # A super-class word of several tokens (docs/method.md, section 6): the placeholder starts at the mean of
        # its sub-token embeddings, and i_super is read at its last sub-token, which the causal text encoder lets
        # see the whole word (Perfusion.initialize_targets).
        self.superclass_token_counts = []
        if initializer_words:
            init_ids = [superclass_token_ids(embedder, w) for w in initializer_words]
            self.superclass_token_counts = [len(t) for t in init_ids]
            initial = torch.stack([table[t].detach().float().mean(dim=0) for t in init_ids])
        else:  # inference: values come from concept files
            initial = torch.zeros(len(ids), table.shape[1])
        self.embeddings = nn.Parameter(initial)
        # Without initializer words the vectors are placeholders for concept files: inactive until loaded.
        self.active = bool(initializer_words)

    def forward(self, tokens: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
        """Replace the embedding of every placeholder token by its learned vector (differentiably)."""
        if not self.active:
            return token_embeds
        out = token_embeds
        for k, token_id in enumerate(self.placeholder_token_ids.tolist()):
            where = (tokens == token_id).unsqueeze(-1)
            if where.any():
                out = torch.where(where, self.embeddings[k].to(out.dtype), out)
        return out

    def concept_positions(self, tokens: torch.Tensor, index: int = 0) -> torch.Tensor:
        """Position of placeholder ``index`` in each tokenised prompt, (B,); found by token id, not by words."""
        hits = tokens == int(self.placeholder_token_ids[index])
        missing = (~hits.any(dim=1)).nonzero().flatten().tolist()
        if missing:
            raise BadValueError(f"prompts {missing} of the batch do not contain the placeholder "
                             f"'{self.placeholder_strings[index]}'")
        return hits.float().argmax(dim=1)

    @torch.no_grad()
    def set_embeddings(self, embeddings: torch.Tensor, placeholder_strings: Sequence[str], embedder) -> None:
        """Replace placeholders and their vectors (inference with concepts loaded from files)."""
        ids = [single_token_id(embedder, p, "placeholder") for p in placeholder_strings]
        self.placeholder_strings = list(placeholder_strings)
        self.placeholder_token_ids = torch.tensor(ids, dtype=torch.long, device=self.embeddings.device)
        self.embeddings = nn.Parameter(embeddings.detach().clone().to(self.embeddings.device).float(),
                                       requires_grad=self.embeddings.requires_grad)
        self.active = True


class SDXLEmbeddingManager(nn.Module):
    """SD XL: the placeholder is one token for each of the two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG), so
    it has two learned embeddings (768 and 1280 wide), both trained; one ``EmbeddingManager`` per encoder.

    ``embedder`` is an ``SDXLConditioner``; it calls ``encoder_hooks`` (CLIP's manager, OpenCLIP's) on the token
    embeddings of its encoders. ``embeddings`` is their concatenation (K, 768 + 1280), the form concept files store
    (``embedding_widths`` splits it); the parameters the optimizer trains are the two managers' own.
    """

    def __init__(self, embedder, placeholder_strings: Sequence[str] = ("*",),
                 initializer_words: Sequence[str] = (), num_vectors_per_token: int = 1):
        super().__init__()
        encoders = getattr(embedder, "text_encoders", None)
        if encoders is None or len(encoders) != 2:
            raise BadValueError("SDXLEmbeddingManager needs SD XL's conditioner (two text encoders); for SD 1.x/2.x "
                                "use perfusion.embedding_manager.EmbeddingManager")
        self.managers = nn.ModuleList([EmbeddingManager(encoder, placeholder_strings, initializer_words,
                                                        num_vectors_per_token) for encoder in encoders])
        self._check_same_tokens(encoders)

    def _check_same_tokens(self, encoders) -> None:
        """Both tokenizers must read the placeholders (and super-class words) alike: one grid of positions."""
        first, second = self.managers
        ids = [[single_token_id(encoder, p, "placeholder") for p in first.placeholder_strings] for encoder in encoders]
        if ids[0] != ids[1] or first.superclass_token_counts != second.superclass_token_counts:
            raise PlaceholderError(f"the two SD XL tokenizers read the placeholders {first.placeholder_strings} or "
                                   "their super-class words differently; pick other strings")

    # the EmbeddingManager interface Perfusion uses ------------------------------------------------------------------
    @property
    def encoder_hooks(self) -> tuple[EmbeddingManager, EmbeddingManager]:
        return self.managers[0], self.managers[1]

    @property
    def embedding_widths(self) -> list[int]:
        return [int(m.embeddings.shape[1]) for m in self.managers]

    @property
    def embeddings(self) -> torch.Tensor:
        """(K, 768 + 1280): CLIP's embedding followed by OpenCLIP's (differentiable)."""
        return torch.cat([m.embeddings for m in self.managers], dim=1)

    @property
    def placeholder_strings(self) -> list[str]:
        return self.managers[0].placeholder_strings

    @property
    def initializer_words(self) -> list[str]:
        return self.managers[0].initializer_words

    @property
    def superclass_token_counts(self) -> list[int]:
        return self.managers[0].superclass_token_counts

    @property
    def active(self) -> bool:
        return self.managers[0].active

    def forward(self, tokens: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
        raise TypeError("SDXLEmbeddingManager is applied per text encoder through encoder_hooks (SDXLConditioner)")

    def concept_positions(self, tokens: torch.Tensor, index: int = 0) -> torch.Tensor:
        return self.managers[0].concept_positions(tokens, index)

    @torch.no_grad()
    def set_embeddings(self, embeddings: torch.Tensor, placeholder_strings: Sequence[str], embedder) -> None:
        """(K, 768 + 1280) concatenated embeddings (as concept files store them) -> each encoder's part."""
        widths = self.embedding_widths
        if embeddings.shape[-1] != sum(widths):
            raise BadValueError(f"SD XL concept embeddings are {sum(widths)} wide ({' + '.join(map(str, widths))}), "
                                f"got {embeddings.shape[-1]}")
        for manager, encoder, part in zip(self.managers, embedder.text_encoders, embeddings.split(widths, dim=-1)):
            manager.set_embeddings(part, placeholder_strings, encoder)
        self._check_same_tokens(embedder.text_encoders)
