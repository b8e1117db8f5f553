"""The Perfusion LightningModule: a frozen LatentDiffusion whose cross-attention K/V projections are
key-locked, gated rank-one edits (perfusion/roe.py); trains the concept word embedding and o*_V.

Method: docs/method.md (sections 3 "Key-locking", 5 "Multiple concepts", 6 "Training"; the paper's Eq. 3 for the edit).

``Perfusion`` runs on SD 1.x / 2.x (one text encoder); ``PerfusionXL`` on SD XL (two text encoders, 2048-wide
context, the vector condition): see its docstring.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ldm.models.diffusion.ddpm import LatentDiffusion, family_of_text_encoder
from ldm.models.diffusion.sdxl import LatentDiffusionXL
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import ConfigError, instantiate_from_config
from perfusion.concept_file import (Concept, check_concepts_compatible, check_target_inputs_independent, load_concept,
                                    save_concept)
from perfusion.covariance import c_inv_hash, load_c_inv
from perfusion.roe import (INFERENCE_BETA, INFERENCE_TAU, TRAIN_BETA, TRAIN_TAU, EditState, edited_layers,
                           inference_gating, swap_cross_attention_projections)

# Keys of a Lightning checkpoint that hold the concept's training state; the frozen base model is not saved
# there (it is rebuilt from the base checkpoint), which keeps resume checkpoints small.
CONCEPT_STATE_MARKERS = ("embedding_manager.", ".target_output", "target_input", "superclass_input",
                         "targets_initialized")


def masked_diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-pixel squared error weighted by the concept's soft mask at latent resolution, mean over the batch.

    mask: (B, H, W) in [0, 1] at image resolution; it is area-resized to the latent grid. Each sample is the
    weighted mean of its squared error, so samples with small masks weigh the same as those with large ones.
    """
    weight = F.interpolate(mask[:, None].float(), size=prediction.shape[-2:], mode="area")
    squared = (prediction.float() - target.float()).pow(2) * weight
    per_sample = squared.sum(dim=(1, 2, 3)) / (weight.sum(dim=(1, 2, 3)) * prediction.shape[1]).clamp_min(1e-8)
    return per_sample.mean()


def base_model_family(text_encoder) -> str:
    return family_of_text_encoder(type(text_encoder).__name__)


def text_encoder_name(text_encoder) -> str:
    version = getattr(text_encoder, "arch", None) or getattr(text_encoder, "version", "")
    return f"{type(text_encoder).__name__}:{version}:width={text_encoder.width}"


class Perfusion(LatentDiffusion):
    """Perfusion training and inference (module docstring). ``lock_keys: false``, an ablation (docs/method.md
    section 10): o*_K trains like o*_V (same start W_K i_super, same learning rate) instead of being locked, and the
    concept file stores it."""

    # False in perfusion.baselines.TextualInversion: the UNet keeps its plain K/V projections
    edits_cross_attention = True

    def __init__(self, personalization_config, C_inv_path: str | None = None, beta: float = TRAIN_BETA,
                 tau: float = TRAIN_TAU, target_input_momentum: float = 0.99,
                 embedding_learning_rate: float = 0.006, target_output_learning_rate: float = 0.03,
                 sample_steps: int = 50, sample_scale: float = 6.0, cache_latents: bool = True,
                 lock_keys: bool = True, *args, **kwargs):
        super().__init__(*args, **kwargs)  # builds the base model and loads its checkpoint (ckpt_path)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.embedding_manager = instantiate_from_config(personalization_config, embedder=self.cond_stage_model)
        self.edit_state = EditState(beta=beta, tau=tau)
        self.lock_keys = bool(lock_keys)
        if self.edits_cross_attention:
            swap_cross_attention_projections(self.model.diffusion_model, self.edit_state,
                                             trainable_keys=not self.lock_keys)
        self.target_input_momentum = target_input_momentum
        self.embedding_learning_rate = embedding_learning_rate
        self.target_output_learning_rate = target_output_learning_rate
        self.sample_steps, self.sample_scale = sample_steps, sample_scale
        # first-stage posterior of each deterministic training crop, by the dataset's latent_key (not saved)
        self.cache_latents = cache_latents
        self.latent_cache: dict[str, tuple[bool, torch.Tensor]] = {}
        self.train_beta, self.train_tau = beta, tau
        width = self.cond_stage_model.width
        self.register_buffer("target_input", torch.zeros(width))
        self.register_buffer("superclass_input", torch.zeros(width))
        self.register_buffer("targets_initialized", torch.tensor(False))
        self.c_inv_path = C_inv_path
        self.c_inv_hash = None
        if C_inv_path is not None:
            c_inv = load_c_inv(C_inv_path, expected_dim=width)
            self.c_inv_hash = c_inv_hash(c_inv)
            # float64: C^-1 of a narrow caption set can be badly conditioned, and a = C^-1 i* must stay accurate
            self.register_buffer("c_inv", c_inv.double(), persistent=False)
        self.strict_loading = False  # Lightning checkpoints hold only the concept state (see on_save_checkpoint)

    # ----- edited layers ------------------------------------------------------------------------------------
    @property
    def value_layers(self):
        return edited_layers(self.model.diffusion_model, "value")

    @property
    def key_layers(self):
        return edited_layers(self.model.diffusion_model, "key")

    def keys_not_in_base_checkpoint(self) -> set[str]:
        return {f"model.diffusion_model.{name}.target_output" for name in edited_layers(self.model.diffusion_model)}

    # ----- text side ----------------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.cond_stage_model.tokenize(list(prompts)).to(self.device)

    def get_learned_conditioning(self, prompts):
        """Encode prompts with the learned placeholder embeddings inserted."""
        return self.cond_stage_model.encode_tokens(self.tokenize(prompts), embedding_hook=self.embedding_manager)

    def text_context(self, prompts: Sequence[str], with_concepts: bool = True) -> torch.Tensor:
        """The cross-attention context (B, L, D) of prompts, what the edited K/V layers see; ``with_concepts``: with
        the learned placeholder embeddings inserted."""
        hook = self.embedding_manager if with_concepts else None
        return self.cond_stage_model.encode_tokens(self.tokenize(prompts), embedding_hook=hook)

    def training_conditioning(self, tokens: torch.Tensor, batch, x: torch.Tensor):
        """(the UNet's conditioning, its cross-attention context (B, L, D)) for a training batch's tokens."""
        c = self.cond_stage_model.encode_tokens(tokens, embedding_hook=self.embedding_manager)
        return c, c

    def _reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean over data-parallel ranks, so that every rank holds the same concept statistics."""
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            return trainer.strategy.reduce(tensor, reduce_op="mean")
        return tensor

    @torch.no_grad()
    def initialize_targets(self, superclass_prompts: Sequence[str], positions: torch.Tensor,
                           concept_encodings: torch.Tensor) -> None:
        """First batch, on every rank: i_super (locks o*_K = W_K i_super, initialises o*_V) and i*.

        i_super is the super-class caption's encoding at the super-class word's last sub-token: the word starts
        where the placeholder stands (the captions share the template) and spans n tokens (n > 1 for a word such
        as 'birdbath'), so it is read at ``positions + n - 1``."""
        tokens = self.tokenize(superclass_prompts)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        last_sub_token = positions + self.embedding_manager.superclass_token_counts[0] - 1
        superclass_encodings = self.cond_stage_model.encode_tokens(tokens)[rows, last_sub_token]
        self.superclass_input.copy_(self._reduce_mean(superclass_encodings.float().mean(0)))
        self.target_input.copy_(self._reduce_mean(concept_encodings.float().mean(0)))
        for layer in edited_layers(self.model.diffusion_model).values():
            layer.initialize_targets(self.superclass_input)
        self.targets_initialized.fill_(True)

    @torch.no_grad()
    def update_target_input(self, concept_encodings: torch.Tensor) -> None:
        """i* <- m i* + (1 - m) mean_batch(e_concept), with m = 0.99 per optimizer step.

        Called once per micro-batch; with gradient accumulation over A micro-batches each update uses m^(1/A),
        so the average spans the same number of optimizer steps whatever A is.
        """
        batch_mean = self._reduce_mean(concept_encodings.float().mean(0))
        accumulation = self._trainer.accumulate_grad_batches if self._trainer is not None else 1
        m = self.target_input_momentum ** (1.0 / accumulation)
        self.target_input.mul_(m).add_(batch_mean, alpha=1 - m)

    def apply_training_targets(self) -> None:
        """Single-concept edit state from the current i* (training and training-time sampling)."""
        if not hasattr(self, "c_inv"):
            raise RuntimeError("training needs C^-1: set model.params.C_inv_path (see data/estimate_C_inv.py)")
        self.edit_state.set_targets(self.target_input[None], self.c_inv_target_input()[None])
        self.edit_state.set_gating(self.train_beta, self.train_tau)

    def c_inv_target_input(self) -> torch.Tensor:
        """a = C^-1 i*, computed in float64 outside any autocast region, returned in float32: the concept file
        stores this float32 ``a``, so inference reproduces the training forward whatever the training precision."""
        with torch.autocast(self.device.type, enabled=False):
            return (self.c_inv @ self.target_input.double()).float()

    # ----- training ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def first_stage_posterior(self, x: torch.Tensor, latent_keys: Sequence[str] | None = None):
        """The first stage's posterior of a batch. With ``cache_latents`` and a key for every row (deterministic
        crops), each crop is encoded once: a handful of images are seen hundreds of times, and the VAE encoder at
        512 px costs a sizeable fraction of a UNet forward. The posterior is cached, not a sample of it, so z is
        still drawn afresh at every step (same RNG use as without the cache)."""
        if not (self.cache_latents and latent_keys and all(latent_keys)):
            return self.encode_first_stage(x)
        missing = [row for row, key in enumerate(latent_keys) if key not in self.latent_cache]
        if missing:
            posterior = self.encode_first_stage(x[missing])
            gaussian = isinstance(posterior, DiagonalGaussianDistribution)
            parameters = posterior.parameters if gaussian else posterior
            for index, row in enumerate(missing):
                self.latent_cache[latent_keys[row]] = (gaussian, parameters[index].detach())
        cached = [self.latent_cache[key] for key in latent_keys]
        parameters = torch.stack([tensor for _, tensor in cached]).to(x.device)
        return DiagonalGaussianDistribution(parameters) if cached[0][0] else parameters

    def on_fit_start(self):
        self.latent_cache.clear()  # the first stage or the data may have changed since the last fit

    def shared_step(self, batch):
        x = self.get_input(batch, self.first_stage_key).to(self.device)
        with torch.no_grad():
            z = self.get_first_stage_encoding(self.first_stage_posterior(x, batch.get("latent_key"))).detach()
        prompts = list(batch[self.cond_stage_key])
        tokens = self.tokenize(prompts)
        positions = self.embedding_manager.concept_positions(tokens)
        c, context = self.training_conditioning(tokens, batch, x)
        rows = torch.arange(context.shape[0], device=context.device)
        concept_encodings = context[rows, positions].detach()
        if not bool(self.targets_initialized):
            self.initialize_targets(list(batch["caption_superclass"]), positions, concept_encodings)
        self.update_target_input(concept_encodings)
        self.apply_training_targets()
        t = torch.randint(0, self.num_timesteps, (z.shape[0],), device=self.device).long()
        noise = torch.randn_like(z)
        prediction = self.apply_model(self.q_sample(z, t, noise), t, c)
        target = self.diffusion_target(z, noise, t)
        mask = batch.get("mask")
        mask = torch.ones(z.shape[0], *x.shape[-2:], device=self.device) if mask is None else mask.to(self.device)
        loss = masked_diffusion_loss(prediction, target, mask)
        return loss, {"train/loss": loss.detach(), "train/loss_simple": self.get_loss(prediction, target).detach(),
                      "train/embedding_norm": self.embedding_manager.embeddings.detach().norm()}

    def training_step(self, batch, batch_idx):
        loss, logs = self.shared_step(batch)
        self.log_dict(logs, prog_bar=False, logger=True, on_step=True, on_epoch=False,
                      batch_size=len(batch[self.cond_stage_key]))
        self.log("loss", loss.detach(), prog_bar=True, logger=False, on_step=True,
                 batch_size=len(batch[self.cond_stage_key]))
        return loss

    def configure_optimizers(self):
        targets = [layer.target_output for layer in self.value_layers.values()]
        if not self.lock_keys:  # the ablation: o*_K trains like o*_V
            targets += [layer.target_output for layer in self.key_layers.values()]
        groups = [{"params": list(self.embedding_manager.parameters()), "lr": self.embedding_learning_rate}]
        if targets:
            groups.append({"params": targets, "lr": self.target_output_learning_rate})
        return torch.optim.AdamW(groups)

    def on_save_checkpoint(self, checkpoint):
        state = checkpoint["state_dict"]
        for key in [k for k in state if not any(marker in k for marker in CONCEPT_STATE_MARKERS)]:
            del state[key]

    def concept_state_vector(self) -> torch.Tensor:
        """Everything a concept consists of, flattened (to compare ranks or runs)."""
        parts = [self.embedding_manager.embeddings, self.target_input, self.superclass_input]
        parts += [layer.target_output for layer in edited_layers(self.model.diffusion_model).values()]
        return torch.cat([p.detach().float().flatten() for p in parts])

    # ----- concept files -----------------------------------------------------------------------------------
    def concept_metadata(self) -> dict:
        return {
            "base_model": base_model_family(self.cond_stage_model),
            "text_encoder": text_encoder_name(self.cond_stage_model),
            "placeholder": self.embedding_manager.placeholder_strings[0],
            "superclass": (self.embedding_manager.initializer_words or [""])[0],
            "c_inv_hash": self.c_inv_hash,
            "beta": INFERENCE_BETA, "tau": INFERENCE_TAU, "train_beta": self.train_beta, "train_tau": self.train_tau,
            "training_steps": int(self.global_step) if self._trainer is not None else 0,
        }

    @torch.no_grad()
    def save_concept_file(self, path: str | Path) -> str:
        if not bool(self.targets_initialized):
            raise RuntimeError("no concept to save yet: the targets are initialised on the first training batch")
        return save_concept(
            path,
            value_outputs={name: layer.target_output[0] for name, layer in self.value_layers.items()},
            embedding=self.embedding_manager.embeddings[0],
            target_input=self.target_input,
            c_inv_target_input=self.c_inv_target_input(),
            superclass_input=self.superclass_input,
            metadata=self.concept_metadata(),
            key_outputs=(None if self.lock_keys else
                         {name: layer.target_output[0] for name, layer in self.key_layers.items()}),
        )

    @torch.no_grad()
    def load_concepts(self, concepts: Sequence[Concept | str | Path], beta=None, tau=None,
                      placeholders: Sequence[str] | None = None) -> list[Concept]:
        """Install K concepts for inference (K = 1 included). No C^-1 needed: the files carry C^-1 i*.
        beta, tau: one value or one per concept; default ``inference_gating(K)``.

        ``placeholders`` renames the concepts' placeholder strings (needed when two files share one).
        Trained key outputs (``lock_keys: false`` concepts) replace W_K i_super; an embedding-only (Textual Inversion)
        concept installs its word and no edit (its beta/tau, if given per concept, are dropped).
        """
        names = [str(c) if not isinstance(c, Concept) else f"concept {i + 1}" for i, c in enumerate(concepts)]
        concepts = [c if isinstance(c, Concept) else load_concept(c) for c in concepts]
        check_concepts_compatible(concepts, names)
        check_target_inputs_independent(concepts, names)
        family = base_model_family(self.cond_stage_model)
        values, keys = self.value_layers, self.key_layers
        for name, concept in zip(names, concepts):
            if concept.metadata.get("base_model") != family:
                raise ValueError(f"{name} was trained on base model '{concept.metadata.get('base_model')}' but "
                                 f"this model is '{family}'; use the matching --config/--ckpt")
            if concept.has_edit and list(concept.value_outputs) != list(values):
                raise ValueError(f"{name} edits {len(concept.value_outputs)} value layers that do not match this "
                                 f"UNet's {len(values)} cross-attention layers (another architecture?)")
            if concept.key_outputs is not None and list(concept.key_outputs) != list(keys):
                raise ValueError(f"{name} has {len(concept.key_outputs)} trained key layers that do not match this "
                                 f"UNet's {len(keys)} cross-attention layers (another architecture?)")
        placeholders = list(placeholders or [c.metadata["placeholder"] for c in concepts])
        device = self.device
        self.embedding_manager.set_embeddings(torch.stack([c.embedding for c in concepts]).to(device),
                                              placeholders, self.cond_stage_model)
        # Embedding-only (Textual Inversion) concepts change no layer: the edit holds the other concepts.
        edited = [k for k, c in enumerate(concepts) if c.has_edit]
        if not edited:
            self.edit_state.set_targets(None, None)
            return concepts
        concepts_edited = [concepts[k] for k in edited]
        for name, layer in values.items():
            layer.set_target_outputs(torch.stack([c.value_outputs[name] for c in concepts_edited]).to(device))
        superclass = torch.stack([c.superclass_input for c in concepts_edited]).to(device)
        for name, layer in keys.items():
            layer.initialize_targets(superclass)  # locked: o*_K = W_K i_super
            if any(c.key_outputs is not None for c in concepts_edited):  # trained keys (lock_keys: false)
                dtype = layer.target_output.dtype
                rows = [layer.target_output[k] if c.key_outputs is None else c.key_outputs[name].to(device, dtype)
                        for k, c in enumerate(concepts_edited)]
                layer.set_target_outputs(torch.stack(rows))
        self.edit_state.set_targets(torch.stack([c.target_input for c in concepts_edited]).to(device),
                                    torch.stack([c.c_inv_target_input for c in concepts_edited]).to(device))
        default_beta, default_tau = inference_gating(len(concepts_edited))

        def edited_only(value):  # per-concept lists follow the edited concepts
            if isinstance(value, (list, tuple)) and len(value) == len(concepts) and len(edited) < len(concepts):
                return [value[k] for k in edited]
            return value

        self.edit_state.set_gating(default_beta if beta is None else edited_only(beta),
                                   default_tau if tau is None else edited_only(tau))
        return concepts

    @torch.no_grad()
    def set_global_locking(self, prompts: Sequence[str] | None, superclass_prompts: Sequence[str] | None = None):
        """Global locking: wherever the UNet is given the encoding of ``prompts[n]``, its key layers see the
        encoding of ``superclass_prompts[n]`` (the prompt with each concept's super-class word) instead, so every
        token's key is the super-class prompt's; values still see the concept. ``None`` returns to local locking.
        Other prompts in a batch (guidance's empty prompt) keep their own keys."""
        if prompts is None:
            self.edit_state.set_global_locking(None)
            return
        if superclass_prompts is None or len(superclass_prompts) != len(prompts):
            raise ValueError("set_global_locking needs one super-class prompt per prompt")
        pairs = list(dict.fromkeys(zip(prompts, superclass_prompts)))
        self.edit_state.set_global_locking(self.text_context([p for p, _ in pairs]),
                                           self.text_context([s for _, s in pairs], with_concepts=False))

    # ----- images for the logger ------------------------------------------------------------------------------
    @torch.no_grad()
    def log_images(self, batch, N: int = 4, sample: bool = True, ddim_steps: int | None = None, **kwargs):
        """The base model's log (inputs, reconstruction, samples with the current concept) plus the masks."""
        sample = sample and bool(self.targets_initialized)
        if sample:
            self.apply_training_targets()
        log = super().log_images(batch, N, sample=sample, ddim_steps=ddim_steps or self.sample_steps,
                                 scale=self.sample_scale)
        if "mask" in batch:
            n = log["inputs"].shape[0]
            log["mask"] = batch["mask"][:n, None].to(self.device).float().mul(2).sub(1).expand(-1, 3, -1, -1)
        return log


class PerfusionXL(Perfusion, LatentDiffusionXL):
    """Perfusion on SD XL (docs/method.md section 11). The method is unchanged; only the text side differs:

    * the placeholder is one token for each tokenizer, with two learned embeddings (768 + 1280), both trained
      (``perfusion.embedding_manager.SDXLEmbeddingManager``);
    * i* and i_super are the 2048-wide concatenated encodings (CLIP's and OpenCLIP's hidden states at the
      placeholder's / super-class word's position), C^-1 is 2048 x 2048 (``data/estimate_C_inv.py --type sdxl``),
      and the 70 cross-attention layers are key-locked and value-edited as on SD 1.x/2.x;
    * the conditioning is SD XL's dict ``{"crossattn", "vector"}``; the vector (pooled OpenCLIP embedding, which
      sees the learned embedding too, and the size/crop numbers) reaches the UNet's ``label_emb``, not the edited
      K/V layers. Training conditions on original size = target size = the training image's, crop (0, 0).

    Concept files record ``base_model: sdxl`` (and ``embedding_widths``); SD 1.x/2.x models refuse them and this
    model refuses theirs.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not hasattr(self.embedding_manager, "encoder_hooks"):
            raise ConfigError("PerfusionXL: model.params.personalization_config.target must be "
                              "perfusion.embedding_manager.SDXLEmbeddingManager (one embedding per text encoder)")

    def get_learned_conditioning(self, c, force_zero_text: bool = False) -> dict[str, torch.Tensor]:
        """Prompts, or a dict with ``txt`` and size keys (SDXLConditioner.encode) -> ``{"crossattn", "vector"}``,
        with the learned placeholder embeddings inserted."""
        sizes = {}
        if isinstance(c, Mapping):
            sizes = {k: v for k, v in c.items() if k != "txt"}
            c = c["txt"]
        prompts = [c] if isinstance(c, str) else list(c)
        return self.cond_stage_model.encode_tokens_to_cond(self.tokenize(prompts), embedding_hook=self.embedding_manager,
                                                           sizes=sizes, force_zero_text=force_zero_text)

    def training_conditioning(self, tokens: torch.Tensor, batch, x: torch.Tensor):
        height, width = (int(v) for v in x.shape[-2:])
        sizes = {"original_size_as_tuple": (height, width), "crop_coords_top_left": (0, 0),
                 "target_size_as_tuple": (height, width)}
        c = self.cond_stage_model.encode_tokens_to_cond(tokens, embedding_hook=self.embedding_manager, sizes=sizes)
        return c, c["crossattn"]

    def concept_metadata(self) -> dict:
        return {**super().concept_metadata(), "embedding_widths": self.embedding_manager.embedding_widths}
