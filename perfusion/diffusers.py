"""Perfusion concept files in a diffusers ``StableDiffusionPipeline`` (SD 1.x and SD 2.x), with the same result as
``scripts/perfusion_txt2img.py``.

    pipe = StableDiffusionPipeline.from_pretrained(...)
    tokens = apply_concepts(pipe, ["teddy.safetensors"])         # -> ["<teddy>"]
    image = pipe(f"a photo of a {tokens[0]} on the beach").images[0]
    remove_concepts(pipe)                                         # the base pipeline again

What ``apply_concepts`` changes, all undone by ``remove_concepts``:

* every cross-attention (``attn2``) of the UNet gets a ``PerfusionAttnProcessor``: the attention processor that was
  there, run with K and V projected by ``perfusion.roe.RankOneEditLinear`` (the gated rank-one edit, key-locked
  keys, the same layer class and equations as our own UNet), all sharing one ``perfusion.roe.EditState``;
* each concept's word embedding is added to the text encoder as a new token (see ``concept_token_names`` for the
  names), in a copy of the tokenizer that replaces ``pipe.tokenizer``;
* with ``global_locking=True``, ``pipe.encode_prompt`` also encodes the super-class prompt so that key layers see it.

A concept's value targets o*_V are stored per layer under our original-layout names (``input_blocks.1.1.
transformer_blocks.0.attn2.to_v``); ``original_layer_name`` maps diffusers' UNet module names to them.
The edit lives in the processors, not in the UNet's weights: call ``remove_concepts`` before ``save_pretrained``.
diffusers is not a dependency of the project: it is imported only when these functions run.
"""
from __future__ import annotations

import inspect
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ldm.models.diffusion.ddpm import BASE_FAMILIES, family_of_text_encoder
from ldm.util import BadValueError
from perfusion.concept_file import (Concept, check_concepts_compatible, check_target_inputs_independent, choose_gating,
                                    load_concept)
from perfusion.roe import EditState, RankOneEditLinear

__all__ = ["apply_concepts", "remove_concepts", "applied_concepts", "original_layer_name", "pipeline_family",
           "concept_token_names", "PerfusionAttnProcessor"]

ORIGINAL_UNET_PREFIX = "model.diffusion_model."
_STATE_ATTRIBUTE = "_perfusion_concepts"

# The text encoders of the two families, told apart in diffusers by the activation of their MLPs: OpenAI's CLIP
# ViT-L/14 (SD 1.x) uses quick_gelu, OpenCLIP ViT-H/14 (SD 2.x, converted to a CLIPTextModel) uses gelu.
_FAMILY_OF_ACTIVATION = {"quick_gelu": "sd1", "gelu": "sd2"}


def _require_diffusers():
    try:
        import diffusers
    except ImportError as error:
        raise ImportError("perfusion.diffusers needs the diffusers package (pip install diffusers; it is in "
                          "requirements-test.txt, not a dependency of the project itself)") from error
    return diffusers


# ----- names ---------------------------------------------------------------------------------------------------------
_DOWN = re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")
_MID = re.compile(r"^mid_block\.attentions\.0\.(.+)$")
_UP = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")


def original_layer_name(diffusers_name: str, layers_per_block: int) -> str:
    """Our original-layout name (relative to ``model.diffusion_model``) of a module inside a diffusers SD UNet's
    transformer, by diffusers' conversion rule for SD UNets with ``layers_per_block`` ResNets per down block:

        down_blocks.i.attentions.j.X  <->  input_blocks.{1 + i (layers_per_block + 1) + j}.1.X
        mid_block.attentions.0.X      <->  middle_block.1.X
        up_blocks.i.attentions.j.X    <->  output_blocks.{i (layers_per_block + 1) + j}.1.X

    (input_blocks.0 is conv_in and each down level ends with a downsampler; each up level has one block more.)
    e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v`` -> ``input_blocks.1.1.transformer_blocks
    .0.attn2.to_v``.
    """
    if int(layers_per_block) < 1:
        raise ValueError(f"layers_per_block must be >= 1, got {layers_per_block}")
    per_level = int(layers_per_block) + 1
    if match := _DOWN.match(diffusers_name):
        level, index, rest = int(match[1]), int(match[2]), match[3]
        return f"input_blocks.{1 + level * per_level + index}.1.{rest}"
    if match := _MID.match(diffusers_name):
        return f"middle_block.1.{match[1]}"
    if match := _UP.match(diffusers_name):
        level, index, rest = int(match[1]), int(match[2]), match[3]
        return f"output_blocks.{level * per_level + index}.1.{rest}"
    raise ValueError(f"'{diffusers_name}' is not inside a transformer of a Stable Diffusion UNet (down_blocks.i."
                     "attentions.j, mid_block.attentions.0 or up_blocks.i.attentions.j)")


def _unet_cross_attentions(unet) -> "OrderedDict[str, nn.Module]":
    """{our original-layout name of the attention, e.g. 'input_blocks.1.1.transformer_blocks.0.attn2': module}."""
    layers_per_block = unet.config.layers_per_block
    if not isinstance(layers_per_block, int):
        raise BadValueError(f"the UNet has per-block layers_per_block={layers_per_block}; Stable Diffusion 1.x/2.x "
                            "UNets have one number")
    found = OrderedDict()
    for name, module in unet.named_modules():
        if name.endswith(".attn2") and hasattr(module, "to_k") and hasattr(module, "to_v"):
            found[original_layer_name(name, layers_per_block)] = module
    if not found:
        raise BadValueError(f"{type(unet).__name__} has no cross-attention (attn2) modules; is this a Stable "
                            "Diffusion UNet?")
    return found


def _layer_key(name: str) -> str:
    return name[len(ORIGINAL_UNET_PREFIX):] if name.startswith(ORIGINAL_UNET_PREFIX) else name


def concept_token_names(sources: Sequence, tokens: Optional[Sequence[str]] = None) -> list[str]:
    """The prompt word of each concept: ``<stem>`` of its file name, lower case, runs of other characters than
    a-z, 0-9 and '_' turned into '-' (``Teddy Bear.safetensors`` -> ``<teddy-bear>``); ``<concept-N>`` for a
    ``Concept`` object (N counts from 1); ``-2``, ``-3``, ... appended where two would be equal. ``tokens``, if
    given, are used as they are."""
    if tokens is not None:
        names = [str(t) for t in tokens]
        if len(names) != len(sources):
            raise BadValueError(f"{len(names)} token names for {len(sources)} concepts; give one per concept")
        if len(set(names)) != len(names) or any(not n or any(c.isspace() for c in n) for n in names):
            raise BadValueError(f"token names must be distinct, non-empty and without spaces, got {names}")
        return names
    names: list[str] = []
    for number, source in enumerate(sources, start=1):
        stem = "" if isinstance(source, Concept) else Path(os.fspath(source)).name.removesuffix(".safetensors")
        stem = re.sub(r"[^a-z0-9_]+", "-", stem.lower()).strip("-") or f"concept-{number}"
        name, copy = f"<{stem}>", 2
        while name in names:
            name, copy = f"<{stem}-{copy}>", copy + 1
        names.append(name)
    return names


# ----- which base model a pipeline is -------------------------------------------------------------------------------
def pipeline_family(pipe) -> str:
    """'sd1' or 'sd2' (BASE_FAMILIES names): the family of the pipeline's text encoder."""
    config = getattr(getattr(pipe, "text_encoder", None), "config", None)
    activation = getattr(config, "hidden_act", None)
    if activation not in _FAMILY_OF_ACTIVATION:
        raise BadValueError(f"the pipeline's text encoder ({type(getattr(pipe, 'text_encoder', None)).__name__}, "
                            f"hidden_act={activation!r}) is neither SD 1.x's CLIP nor SD 2.x's OpenCLIP; Perfusion "
                            "concepts work with StableDiffusionPipeline of SD 1.x or 2.x")
    return _FAMILY_OF_ACTIVATION[activation]


def _family_description(name) -> str:
    return next((f"'{f.name}' ({f.description})" for f in BASE_FAMILIES if f.name == name), repr(name))


def _check_concept_fits(name: str, concept: Concept, family: str, width: int, embedding_width: int,
                        cross_attentions: "OrderedDict[str, nn.Module]") -> None:
    """The checks of ``Perfusion.load_concepts`` against a pipeline: base model family, text encoder, layer set."""
    if not concept.has_edit or concept.key_outputs is not None:  # the ablations of docs/method.md section 10
        kind = "an embedding-only (Textual Inversion)" if not concept.has_edit else "a trained-keys (lock_keys: false)"
        raise BadValueError(f"concept {name} is {kind} concept; apply_concepts installs key-locked Perfusion concepts "
                            "only: sample it with scripts/perfusion_txt2img.py")
    trained_on = concept.metadata.get("base_model")
    if trained_on != family:
        raise BadValueError(f"concept {name} was trained on base model {_family_description(trained_on)} but this "
                            f"pipeline is {_family_description(family)}; load the pipeline of the concept's base "
                            "model")
    encoder = str(concept.metadata.get("text_encoder", ""))
    encoder_family = family_of_text_encoder(encoder.split(":", 1)[0])
    widths = re.findall(r"width=(\d+)", encoder)
    if encoder_family != family or (widths and int(widths[-1]) != width) or concept.target_input.shape[0] != width:
        raise BadValueError(f"concept {name} was trained with text encoder '{encoder}' (width "
                            f"{concept.target_input.shape[0]}) but this pipeline's text encoder is the "
                            f"{family} one of width {width}; load the pipeline of the concept's base model")
    if concept.embedding.shape[0] != embedding_width:
        raise BadValueError(f"concept {name} has a word embedding of size {concept.embedding.shape[0]} but this "
                            f"pipeline's text encoder embeds words in {embedding_width}")
    values = {_layer_key(n): v for n, v in concept.value_outputs.items()}
    expected = {f"{n}.to_v": m.to_v.out_features for n, m in cross_attentions.items()}
    if set(values) != set(expected) or any(values[n].shape[0] != w for n, w in expected.items()):
        raise BadValueError(f"concept {name} edits {len(values)} value layers that do not match this UNet's "
                            f"{len(expected)} cross-attention layers (another architecture?)")


# ----- the attention processor ---------------------------------------------------------------------------------------
class _EditedProjections:
    """An ``Attention`` seen through its edited K/V: ``to_k``/``to_v`` are the Perfusion layers, every other
    attribute is the attention module's own."""

    def __init__(self, attention: nn.Module, to_k: RankOneEditLinear, to_v: RankOneEditLinear):
        self._attention, self.to_k, self.to_v = attention, to_k, to_v

    def __getattr__(self, name):
        return getattr(self._attention, name)


class PerfusionAttnProcessor:
    """The cross-attention's previous processor, run with K = to_k(e) and V = to_v(e) of Perfusion: both
    ``RankOneEditLinear`` layers around the attention's own (frozen) projection weights, sharing one ``EditState``.

    Not an ``nn.Module``, so the UNet's state_dict is unchanged; the weights stay the attention's parameters."""

    def __init__(self, inner, to_k: RankOneEditLinear, to_v: RankOneEditLinear):
        self.inner, self.to_k, self.to_v = inner, to_k, to_v

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if getattr(attn, "fused_projections", False):
            raise RuntimeError("the UNet's attention projections are fused (fuse_qkv_projections); Perfusion edits "
                               "to_k/to_v: call pipe.unfuse_qkv_projections() before sampling with concepts")
        return self.inner(_EditedProjections(attn, self.to_k, self.to_v), hidden_states,
                          encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs)


# ----- apply / remove ------------------------------------------------------------------------------------------------
@dataclass
class _Applied:
    """What apply_concepts changed on a pipeline, to undo it."""

    tokens: list
    concepts: list
    state: EditState
    processors: dict                   # attention module -> its previous processor
    requires_grad: dict                # projection weight -> its previous requires_grad
    tokenizer: object
    embedding: nn.Module
    vocab_size: Optional[int]
    superclasses: list = field(default_factory=list)


def applied_concepts(pipe) -> Optional[list]:
    """The token names of the concepts applied to ``pipe`` (None when there are none)."""
    applied = getattr(pipe, _STATE_ATTRIBUTE, None)
    return None if applied is None else list(applied.tokens)


def _add_tokens(base_tokenizer, original: nn.Embedding, tokens: list, embeddings: torch.Tensor):
    """A copy of the tokenizer with ``tokens`` added, and a copy of the text encoder's input embedding grown by
    their rows (neither argument changes)."""
    import copy

    tokenizer = copy.deepcopy(base_tokenizer)
    for token in tokens:
        if token in tokenizer.get_vocab():
            raise BadValueError(f"'{token}' is already a token of the pipeline's tokenizer; give apply_concepts "
                                "tokens=[...] with new words such as '<teddy>'")
    if tokenizer.add_tokens(list(tokens)) != len(tokens):
        raise BadValueError(f"the tokenizer did not add all of {tokens} as new tokens")
    for token in tokens:
        if len(tokenizer.tokenize(f"a {token} b")) != 3:
            raise BadValueError(f"the tokenizer does not read '{token}' as one word of its own in a prompt; choose "
                                "another token name")
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    if ids != list(range(original.num_embeddings, original.num_embeddings + len(tokens))):
        raise BadValueError(f"the tokenizer gave the new tokens ids {ids}, but the text encoder embeds "
                            f"{original.num_embeddings} tokens; is the pipeline's tokenizer that of its text encoder?")
    grown = nn.Embedding(original.num_embeddings + len(tokens), original.embedding_dim,
                         device=original.weight.device, dtype=original.weight.dtype)
    with torch.no_grad():
        grown.weight.copy_(torch.cat([original.weight, embeddings.to(original.weight)]))
    grown.weight.requires_grad_(original.weight.requires_grad)
    return tokenizer, grown


def _install_global_locking(pipe, applied: _Applied) -> None:
    """Wrap ``pipe.encode_prompt``: after encoding the prompts, encode them again with each concept token replaced
    by its super-class word and lock the key layers to those (``EditState.set_global_locking``), as
    ``Perfusion.set_global_locking`` does in scripts/perfusion_txt2img.py."""
    encode_prompt = pipe.encode_prompt
    signature = inspect.signature(encode_prompt)
    patterns = [(re.compile(re.escape(t), re.IGNORECASE), s) for t, s in zip(applied.tokens, applied.superclasses)]

    def encode_with_global_locking(*args, **kwargs):
        encoded = encode_prompt(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        prompt = arguments.get("prompt")
        if prompt is None:
            raise BadValueError("global locking needs the prompt text to make its super-class prompt; pass prompt=..."
                                " rather than prompt_embeds (or apply the concepts with global_locking=False)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        superclass_prompts = []
        for text in prompts:
            for pattern, word in patterns:
                text = pattern.sub(word, text)
            superclass_prompts.append(text)
        if superclass_prompts == prompts:          # no concept in these prompts: keys are the prompts' own
            applied.state.set_global_locking(None)
            return encoded
        arguments.update(prompt=superclass_prompts, do_classifier_free_guidance=False, negative_prompt=None,
                         prompt_embeds=None, negative_prompt_embeds=None)
        superclass = encode_prompt(**arguments)[0]
        applied.state.set_global_locking(encoded[0], superclass)
        return encoded

    pipe.encode_prompt = encode_with_global_locking


def apply_concepts(pipe, concept_files: Sequence, beta=None, tau=None, global_locking: bool = False, *,
                   tokens: Optional[Sequence[str]] = None) -> list[str]:
    """Install Perfusion concepts in a diffusers ``StableDiffusionPipeline`` (SD 1.x or 2.x); returns the word of
    each concept to write in prompts, in the order of ``concept_files`` (see ``concept_token_names``:
    ``teddy.safetensors`` -> ``<teddy>``; ``tokens`` chooses them instead).

    concept_files: concept file paths (or loaded ``Concept``s). Several are one multi-concept edit, as several
        ``--personalized_ckpt`` files of scripts/perfusion_txt2img.py.
    beta, tau: gate bias and temperature, one value or one per concept; None: as perfusion_txt2img.py without
        --beta/--tau (``perfusion.concept_file.choose_gating``): a beta/tau selected in the concept file for this
        locking mode (``scripts/evaluate.py --select-beta``), else ``inference_gating(K)`` (0.7 and 0.15; beta 0.6
        for several concepts).
    global_locking: keys see the super-class prompt (each concept's token replaced by its super-class word, which
        must be one token), values the concept prompt; as perfusion_txt2img.py --global_locking.

    Concepts already applied to ``pipe`` are replaced. Refuses, with a one-line error, a concept of another base
    model family or text encoder, or of another UNet layout; concepts of different C^-1 or the same concept twice.
    """
    _require_diffusers()
    if isinstance(concept_files, (str, os.PathLike, Concept)):
        concept_files = [concept_files]
    sources = list(concept_files)
    if not sources:
        raise BadValueError("apply_concepts: give at least one concept file")
    for attribute in ("unet", "text_encoder", "tokenizer"):
        if getattr(pipe, attribute, None) is None:
            raise BadValueError(f"apply_concepts needs a pipeline with a {attribute} (a StableDiffusionPipeline)")
    names = [f"concept {i + 1}" if isinstance(s, Concept) else os.fspath(s) for i, s in enumerate(sources)]
    concepts = [s if isinstance(s, Concept) else load_concept(s) for s in sources]
    token_names = concept_token_names(sources, tokens)

    family = pipeline_family(pipe)
    cross_attentions = _unet_cross_attentions(pipe.unet)
    width = int(pipe.text_encoder.config.hidden_size)
    embedding_width = pipe.text_encoder.get_input_embeddings().embedding_dim
    for name, concept in zip(names, concepts):
        _check_concept_fits(name, concept, family, width, embedding_width, cross_attentions)
    check_concepts_compatible(concepts, names)
    check_target_inputs_independent(concepts, names)
    beta, tau, _, _ = choose_gating(concepts, beta, tau, global_locking, names)

    superclasses = []
    if global_locking:
        for name, concept in zip(names, concepts):
            word = concept.metadata.get("superclass") or concept.metadata["placeholder"]
            if len(pipe.tokenizer.tokenize(word)) != 1:
                raise BadValueError(f"global locking: the super-class word '{word}' of {name} is several tokens, so "
                                    "the super-class prompt's tokens do not line up with the concept prompt's; use "
                                    "local locking (global_locking=False)")
            superclasses.append(word)

    state = EditState()
    state.set_gating(beta, tau)
    if state.beta.numel() not in (1, len(concepts)) or state.tau.numel() not in (1, len(concepts)):
        raise BadValueError(f"beta/tau: give one value or one per concept ({len(concepts)}), got beta={beta!r}, "
                            f"tau={tau!r}")
    for name, attention in cross_attentions.items():
        for projection in (attention.to_k, attention.to_v):
            if not isinstance(projection, nn.Linear) or projection.bias is not None:
                raise BadValueError(f"{name}: to_k/to_v is a {type(projection).__name__}"
                                    f"{' with bias' if isinstance(projection, nn.Linear) else ''}, not the plain "
                                    "bias-free nn.Linear of SD; unload or fuse LoRA adapters before apply_concepts")

    previous = getattr(pipe, _STATE_ATTRIBUTE, None)     # concepts applied before: start from the base pipeline's
    original_embedding = previous.embedding if previous else pipe.text_encoder.get_input_embeddings()
    tokenizer, grown = _add_tokens(previous.tokenizer if previous else pipe.tokenizer, original_embedding,
                                   token_names, torch.stack([c.embedding.float() for c in concepts]))

    # Everything is checked: from here on the pipeline changes.
    remove_concepts(pipe)
    processors, edits = {}, {}
    requires_grad = {p.weight: p.weight.requires_grad for a in cross_attentions.values() for p in (a.to_k, a.to_v)}
    for name, attention in cross_attentions.items():
        edits[name] = (RankOneEditLinear(attention.to_k, "key", state, len(concepts)),
                       RankOneEditLinear(attention.to_v, "value", state, len(concepts)))

    values = [{_layer_key(n): v for n, v in c.value_outputs.items()} for c in concepts]
    with torch.no_grad():
        superclass_inputs = torch.stack([c.superclass_input for c in concepts])
        for name, (key, value) in edits.items():
            value.set_target_outputs(torch.stack([v[f"{name}.to_v"] for v in values]))
            key.initialize_targets(superclass_inputs)
        state.set_targets(torch.stack([c.target_input for c in concepts]),
                          torch.stack([c.c_inv_target_input for c in concepts]))

    for name, attention in cross_attentions.items():
        processors[attention] = attention.processor
        attention.set_processor(PerfusionAttnProcessor(attention.processor, *edits[name]))
    vocab_size = getattr(pipe.text_encoder.config, "vocab_size", None)
    pipe.text_encoder.set_input_embeddings(grown)
    if vocab_size is not None:
        pipe.text_encoder.config.vocab_size = grown.num_embeddings
    applied = _Applied(tokens=token_names, concepts=concepts, state=state, processors=processors,
                       requires_grad=requires_grad, tokenizer=pipe.tokenizer, embedding=original_embedding,
                       vocab_size=vocab_size, superclasses=superclasses)
    pipe.tokenizer = tokenizer
    setattr(pipe, _STATE_ATTRIBUTE, applied)
    if global_locking:
        _install_global_locking(pipe, applied)
    return list(token_names)


def remove_concepts(pipe) -> None:
    """Undo ``apply_concepts``: the previous attention processors, tokenizer, text-encoder embedding and
    ``encode_prompt`` come back (the pipeline gives the base model's images again). No-op without concepts."""
    applied = getattr(pipe, _STATE_ATTRIBUTE, None)
    if applied is None:
        return
    for attention, processor in applied.processors.items():
        attention.set_processor(processor)
    for weight, flag in applied.requires_grad.items():
        weight.requires_grad_(flag)
    pipe.text_encoder.set_input_embeddings(applied.embedding)
    if applied.vocab_size is not None:
        pipe.text_encoder.config.vocab_size = applied.vocab_size
    pipe.tokenizer = applied.tokenizer
    pipe.__dict__.pop("encode_prompt", None)
    delattr(pipe, _STATE_ATTRIBUTE)
