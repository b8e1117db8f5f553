"""DDPM and LatentDiffusion (Stable Diffusion) as Lightning modules, checkpoint-compatible with CompVis/Stability."""
from __future__ import annotations

import contextlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule
from ldm.modules.ema import LitEma
from ldm.modules.encoders.modules import first_eos_positions
from ldm.util import CheckpointError, default, instantiate_from_config, load_state_dict

BACKBONE_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
# (EMA attribute, averaged module): the UNet always, the text encoder when it is trained too.
EMA_OF = (("model_ema", "model"), ("cond_stage_model_ema", "cond_stage_model"))


@dataclass(frozen=True)
class BaseFamily:
    """A family of base models: the text-encoder class that tells it, the checkpoint key prefix of that encoder,
    and the inference config of the family's Perfusion concepts."""
    name: str
    description: str
    text_encoder_class: str
    checkpoint_prefix: str
    inference_config: str


BASE_FAMILIES = (
    BaseFamily("sd1", "Stable Diffusion 1.x (CLIP ViT-L/14 text encoder)", "FrozenCLIPEmbedder",
               "cond_stage_model.transformer.", "configs/perfusion_inference.yaml"),
    BaseFamily("sd2", "Stable Diffusion 2.x (OpenCLIP ViT-H/14 text encoder)", "FrozenOpenCLIPEmbedder",
               "cond_stage_model.model.", "configs/perfusion_inference_sd_v2.yaml"),
    BaseFamily("sdxl", "Stable Diffusion XL (CLIP ViT-L/14 + OpenCLIP ViT-bigG/14 text encoders)", "SDXLConditioner",
               "conditioner.embedders.", "configs/perfusion_inference_sdxl.yaml"),
)


def family_of_text_encoder(class_name: str) -> str:
    """The family name (sd1, sd2, sdxl) a text-encoder class belongs to; another class names itself."""
    return next((f.name for f in BASE_FAMILIES if f.text_encoder_class == class_name), class_name)


def disabled_train(self, mode: bool = True):
    """Replacement for ``nn.Module.train`` on frozen parts: they stay in eval mode."""
    return self


def checkpoint_family(keys: Iterable[str]) -> str | None:
    """Which Stable Diffusion family a state dict belongs to, judged by its text-encoder keys."""
    keys = list(keys)
    for family in BASE_FAMILIES:
        if any(k.startswith(family.checkpoint_prefix) for k in keys):
            return family.description
    return None


def cross_attention_context_dim(state: dict[str, torch.Tensor]) -> int | None:
    for k, v in state.items():
        if k.endswith("attn2.to_k.weight"):
            return int(v.shape[1])
    return None


def check_checkpoint_matches(model_state: dict[str, torch.Tensor], ckpt_state: dict[str, torch.Tensor],
                             path: str) -> None:
    """Raise one readable error when a checkpoint is of another model family or size than the config."""
    model_family, ckpt_family = checkpoint_family(model_state), checkpoint_family(ckpt_state)
    model_ctx, ckpt_ctx = cross_attention_context_dim(model_state), cross_attention_context_dim(ckpt_state)
    mismatched = [k for k, v in ckpt_state.items() if k in model_state and model_state[k].shape != v.shape]
    family_differs = model_family and ckpt_family and model_family != ckpt_family
    if family_differs or (model_ctx and ckpt_ctx and model_ctx != ckpt_ctx) or mismatched:
        hint = ("for SD 2.x weights use configs/stable-diffusion/v2-inference.yaml (or a *_sd_v2.yaml Perfusion "
                "config); for SD 1.x weights use configs/stable-diffusion/v1-inference.yaml; for SD XL base weights "
                "use configs/stable-diffusion/sdxl-base.yaml")
        example = ""
        if mismatched:
            k = mismatched[0]
            example = (f"; {len(mismatched)} tensors differ in shape, e.g. {k}: checkpoint "
                       f"{tuple(ckpt_state[k].shape)} vs model {tuple(model_state[k].shape)}")
        raise CheckpointError(
            f"checkpoint {path} does not match the model config: checkpoint is "
            f"{ckpt_family or 'of unknown family'} with cross-attention context {ckpt_ctx}, the config builds "
            f"{model_family or 'a model of unknown family'} with context {model_ctx}{example}. Fix: {hint}."
        )


class DiffusionWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model`` (the checkpoint's ``model.diffusion_model.*`` names)."""

    def __init__(self, diff_model_config, conditioning_key: str | None):
        super().__init__()
        self.diffusion_model = instantiate_from_config(diff_model_config)
        if conditioning_key not in (None, "concat", "crossattn", "hybrid"):
            raise ValueError(f"unsupported conditioning_key '{conditioning_key}'")
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_concat: Sequence[torch.Tensor] | None = None,
                c_crossattn: Sequence[torch.Tensor] | None = None, y: torch.Tensor | None = None):
        """``y``: the vector condition of UNets built with ``num_classes: sequential`` (SD XL)."""
        extra = {} if y is None else {"y": y}
        key = self.conditioning_key
        if key is None:
            return self.diffusion_model(x, t, **extra)
        if key in ("concat", "hybrid"):
            x = torch.cat([x, *c_concat], dim=1)
        context = torch.cat(list(c_crossattn), dim=1) if key in ("crossattn", "hybrid") else None
        return self.diffusion_model(x, t, context=context, **extra)


class DDPM(pl.LightningModule):
    """Gaussian diffusion with a noise schedule, eps or v parameterisation, optional EMA."""

    # Checkpoint prefixes of the base model's weights: a checkpoint lacking any of the model's weights under them is
    # refused by init_from_ckpt. Checkpoint keys that are dropped before loading (constants the model rebuilds).
    BACKBONE_PREFIXES = BACKBONE_PREFIXES
    IGNORED_CHECKPOINT_KEYS: tuple[str, ...] = ()

    # Keys of the original LDM configs that this implementation does not use (accepted with a warning).
    UNUSED_CONFIG_KEYS = {
        "monitor": "there is no validation loop; checkpoints are written by step (lightning.modelcheckpoint_step)",
        "use_positional_encodings": "SD never enables it and it is not implemented",
        "make_it_fit": "weights are loaded by name; shapes must match",
        "reset_ema": "EMA restarts by itself when a checkpoint has no EMA weights",
        "reset_num_ema_updates": "EMA restarts by itself when a checkpoint has no EMA weights",
    }

    def __init__(self, unet_config, timesteps: int = 1000, beta_schedule: str = "linear", loss_type: str = "l2",
                 ckpt_path: str | None = None, ignore_keys: Sequence[str] = (), load_only_unet: bool = False,
                 use_ema: bool = True, first_stage_key: str = "image",
                 image_size: int = 256, channels: int = 3, log_every_t: int = 100, clip_denoised: bool = True,
                 linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3, given_betas=None,
                 original_elbo_weight: float = 0.0, v_posterior: float = 0.0, l_simple_weight: float = 1.0,
                 conditioning_key: str | None = None, parameterization: str = "eps", scheduler_config=None,
                 learn_logvar: bool = False, logvar_init: float = 0.0,
                 ema_decay: float = 0.9999, snr_gamma: float | None = None, noise_offset: float = 0.0):
        super().__init__()
        if parameterization not in ("eps", "x0", "v"):
            raise ValueError(f"parameterization must be eps, x0 or v, not '{parameterization}'")
        self.parameterization = parameterization
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.log_every_t = log_every_t
        self.clip_denoised = clip_denoised
        self.original_elbo_weight = original_elbo_weight
        self.v_posterior = v_posterior
        self.l_simple_weight = l_simple_weight
        self.loss_type = loss_type
        self.scheduler_config = scheduler_config
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.use_ema, self.ema_decay = use_ema, ema_decay
        if use_ema:
            self.model_ema = LitEma(self.model, decay=ema_decay)
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be positive (min-SNR weighting) or null, got {snr_gamma}")
        self.snr_gamma = snr_gamma
        self.noise_offset = noise_offset
        self.register_schedule(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        self.learn_logvar = learn_logvar
        logvar = torch.full((self.num_timesteps,), float(logvar_init))
        self.logvar = nn.Parameter(logvar) if learn_logvar else logvar
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=load_only_unet)

    # ----- schedule -------------------------------------------------------------------------------------------
    def register_schedule(self, given_betas=None, beta_schedule="linear", timesteps=1000, linear_start=1e-4,
                          linear_end=2e-2, cosine_s=8e-3):
        betas = (np.asarray(given_betas, dtype=np.float64) if given_betas is not None else
                 make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s))
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.num_timesteps = len(betas)
        self.linear_start, self.linear_end = linear_start, linear_end

        def buffer(name, values):
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32))

        buffer("betas", betas)
        buffer("alphas_cumprod", alphas_cumprod)
        buffer("alphas_cumprod_prev", alphas_cumprod_prev)
        buffer("sqrt_alphas_cumprod", np.sqrt(alphas_cumprod))
        buffer("sqrt_one_minus_alphas_cumprod", np.sqrt(1.0 - alphas_cumprod))
        buffer("log_one_minus_alphas_cumprod", np.log(1.0 - alphas_cumprod))
        buffer("sqrt_recip_alphas_cumprod", np.sqrt(1.0 / alphas_cumprod))
        buffer("sqrt_recipm1_alphas_cumprod", np.sqrt(1.0 / alphas_cumprod - 1))
        posterior_variance = ((1 - self.v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
                              + self.v_posterior * betas)
        buffer("posterior_variance", posterior_variance)
        buffer("posterior_log_variance_clipped", np.log(np.maximum(posterior_variance, 1e-20)))
        buffer("posterior_mean_coef1", betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod))
        buffer("posterior_mean_coef2", (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod))
        with np.errstate(divide="ignore"):  # posterior_variance[0] is 0; that entry is replaced below
            lvlb = self._lvlb_weights(betas, alphas_cumprod, posterior_variance)
        lvlb[0] = lvlb[1]
        buffer("lvlb_weights", lvlb)

    def _lvlb_weights(self, betas, alphas_cumprod, posterior_variance):
        if self.parameterization == "eps":
            return betas**2 / (2 * posterior_variance * (1.0 - betas) * (1.0 - alphas_cumprod))
        elif self.parameterization == "x0":
            return 0.5 * np.sqrt(alphas_cumprod) / (2.0 * (1.0 - alphas_cumprod))
        return np.ones_like(betas)

    # ----- forward process and parameterisations ------------------------------------------------------------------
    def q_sample(self, x_start, t, noise=None):
        noise = default(noise, lambda: torch.randn_like(x_start))
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def get_v(self, x, noise, t):
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x.shape) * noise
                - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x.shape) * x)

    def predict_eps_from_z_and_v(self, x_t, t, v):
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * v
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t)

    def diffusion_target(self, x_start, noise, t):
        """What the network is trained to predict at (x_start, noise, t)."""
        if self.parameterization == "eps":
            return noise
        if self.parameterization == "v":
            return self.get_v(x_start, noise, t)
        return x_start

    def min_snr_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma loss weight (Hang et al. 2023), expressed for the model's parameterisation: the
        x0-space weight min(SNR, gamma) divided by what the eps / v / x0 loss already weighs x0 by."""
        alpha_bar = self.alphas_cumprod[t]
        snr = alpha_bar / (1.0 - alpha_bar)
        clipped = snr.clamp(max=self.snr_gamma)
        if self.parameterization == "eps":
            return clipped / snr
        if self.parameterization == "v":
            return clipped / (snr + 1.0)
        return clipped

    def get_loss(self, pred, target, mean: bool = True):
        if self.loss_type == "l1":
            loss = (target - pred).abs()
        elif self.loss_type == "l2":
            loss = F.mse_loss(target, pred, reduction="none")
        else:
            raise ValueError(f"unknown loss type '{self.loss_type}'")
        return loss.mean() if mean else loss

    # ----- checkpoints and EMA -----------------------------------------------------------------------------------
    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = (), only_model: bool = False):
        """Load an original-layout checkpoint (``.ckpt``/``.safetensors``) or a diffusers model folder (converted
        to the original layout, checked against this model's family) without executing pickled code."""
        from ldm.diffusers_format import check_folder_matches_model, fill_unused_text_encoder_weights, \
            is_diffusers_folder

        folder = is_diffusers_folder(path)
        if folder:
            check_folder_matches_model(path, self)
        state = load_state_dict(path)
        if folder and getattr(self, "cond_stage_model", None) is not None:
            # weights a diffusers SD 2.x text encoder does not hold and our encoder does not use keep their values
            fill_unused_text_encoder_weights(state, self.cond_stage_model)
        state = {k: v for k, v in state.items()
                 if not any(k.startswith(p) for p in ignore_keys) and k not in self.IGNORED_CHECKPOINT_KEYS}
        target = self.model if only_model else self
        if only_model:
            state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        own = target.state_dict()
        check_checkpoint_matches(own, state, path)
        missing, unexpected = target.load_state_dict(state, strict=False)
        prefixes = ("diffusion_model.",) if only_model else self.BACKBONE_PREFIXES
        added = self.keys_not_in_base_checkpoint()
        missing_backbone = [k for k in missing if k.startswith(prefixes) and k not in added]
        if missing_backbone:
            raise CheckpointError(
                f"checkpoint {path} lacks {len(missing_backbone)} backbone weights, e.g. {missing_backbone[:3]}; "
                "is it a full Stable Diffusion checkpoint (UNet, VAE and text encoder)?")
        self._restart_ema_without_averages(state)
        return missing, unexpected

    def _restart_ema_without_averages(self, state: dict) -> None:
        """A checkpoint without EMA buffers (e.g. an exported EMA-only model) starts the averages at the loaded
        weights, so that training on from it does not average with the random initialisation."""
        for ema_name, module_name in EMA_OF:
            ema = getattr(self, ema_name, None)
            if isinstance(ema, LitEma) and not any(k.startswith(f"{ema_name}.") for k in state):
                setattr(self, ema_name, LitEma(getattr(self, module_name), decay=float(ema.decay)))

    def keys_not_in_base_checkpoint(self) -> set[str]:
        """State-dict keys a subclass adds on top of the base model (never in an SD checkpoint)."""
        return set()

    def ema_pairs(self) -> list[tuple[LitEma, nn.Module]]:
        """(EMA, module) pairs kept by this model: the UNet, and a text encoder trained with it."""
        return [(getattr(self, e), getattr(self, m)) for e, m in EMA_OF if isinstance(getattr(self, e, None), LitEma)]

    @contextmanager
    def ema_scope(self):
        pairs = self.ema_pairs()
        for ema, module in pairs:
            ema.store(module.parameters())
            ema.copy_to(module)
        try:
            yield None
        finally:
            for ema, module in pairs:
                ema.restore(module.parameters())

    def on_train_batch_end(self, *args, **kwargs):
        for ema, module in self.ema_pairs():
            ema(module)

    # ----- training ---------------------------------------------------------------------------------------------
    def apply_model(self, x_noisy, t, cond=None):
        return self.model(x_noisy, t)

    def training_noise(self, x_start: torch.Tensor) -> torch.Tensor:
        """Gaussian noise, plus ``noise_offset`` times one random value per sample and channel ("offset noise"):
        otherwise the mean of the noise gives away the image's mean colour at high noise levels, and the model
        learns to take global colour (e.g. the background) from the start noise instead of from the text."""
        noise = torch.randn_like(x_start)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn(*x_start.shape[:2], *([1] * (x_start.dim() - 2)),
                                                            device=x_start.device, dtype=x_start.dtype)
        return noise

    def p_losses(self, x_start, cond, t, noise=None):
        noise = default(noise, lambda: self.training_noise(x_start))
        x_noisy = self.q_sample(x_start, t, noise)
        model_output = self.apply_model(x_noisy, t, cond)
        target = self.diffusion_target(x_start, noise, t)
        loss_simple = self.get_loss(model_output, target, mean=False).mean(dim=[1, 2, 3])
        if self.snr_gamma is not None:
            loss_simple = loss_simple * self.min_snr_weight(t)
        logvar_t = self.logvar.to(self.device)[t]
        loss = self.l_simple_weight * (loss_simple / torch.exp(logvar_t) + logvar_t).mean()
        loss_vlb = (self.lvlb_weights[t] * loss_simple).mean()
        loss = loss + self.original_elbo_weight * loss_vlb
        prefix = "train" if self.training else "val"
        return loss, {f"{prefix}/loss_simple": loss_simple.mean(), f"{prefix}/loss_vlb": loss_vlb,
                      f"{prefix}/loss": loss}

    def get_input(self, batch, key):
        x = batch[key]
        if x.dim() == 3:
            x = x[..., None]
        if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):  # b h w c -> b c h w
            x = x.permute(0, 3, 1, 2)
        return x.to(memory_format=torch.contiguous_format).float()

    def shared_step(self, batch):
        x = self.get_input(batch, self.first_stage_key)
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=self.device).long()
        return self.p_losses(x, None, t)

    def training_step(self, batch, batch_idx):
        loss, logs = self.shared_step(batch)
        self.log_dict(logs, prog_bar=False, logger=True, on_step=True, on_epoch=False)
        return loss

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.learn_logvar:
            params.append(self.logvar)
        return params

    def configure_optimizers(self):
        lr = getattr(self, "learning_rate", 1e-4)
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=lr)
        if self.scheduler_config is None:
            return optimizer
        schedule = instantiate_from_config(self.scheduler_config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


class LatentDiffusion(DDPM):
    """Diffusion in the latent space of a frozen autoencoder, conditioned on a frozen text encoder."""

    UNUSED_CONFIG_KEYS = {
        "num_timesteps_cond": "the text conditioning is never noised (SD configs set it to 1)",
        "cond_stage_forward": "the text encoder's encode() is always used",
        "unet_trainable": "the UNet trains when no concept is given (base-model training) and is frozen otherwise",
        "force_null_conditioning": "the text conditioning is always used (SD 1.x/2.x text-to-image models)",
    }

    def __init__(self, first_stage_config, cond_stage_config, cond_stage_key="image",
                 cond_stage_trainable: bool = False, concat_mode: bool = True,
                 conditioning_key: str | None = None, scale_factor: float = 1.0, scale_by_std: bool = False,
                 truncation_dropout: float = 0.0, word_dropout: float = 0.0, *args, **kwargs):
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", ())
        for name, p in (("truncation_dropout", truncation_dropout), ("word_dropout", word_dropout)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], got {p}")
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)
        self.cond_stage_key = cond_stage_key
        self.cond_stage_trainable = cond_stage_trainable
        self.truncation_dropout, self.word_dropout = truncation_dropout, word_dropout
        self.scale_by_std = scale_by_std
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        else:
            self.scale_factor = scale_factor
        self.first_stage_model = self._frozen(instantiate_from_config(first_stage_config))
        self.cond_stage_model = instantiate_from_config(cond_stage_config)
        if not cond_stage_trainable:
            self._frozen(self.cond_stage_model)
        elif self.use_ema:  # a text encoder trained with the UNet is averaged with it
            self.cond_stage_model_ema = LitEma(self.cond_stage_model, decay=self.ema_decay)
        self.restarted_from_ckpt = False
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)
            self.restarted_from_ckpt = True

    @staticmethod
    def _frozen(module: nn.Module) -> nn.Module:
        module.eval()
        module.train = disabled_train.__get__(module)
        for p in module.parameters():
            p.requires_grad = False
        return module

    # ----- first and conditioning stages -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior, generator=None):
        if hasattr(encoder_posterior, "sample"):
            z = encoder_posterior.sample(generator)
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"unexpected first-stage output {type(encoder_posterior).__name__}")
        return self.scale_factor * z

    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor)

    def get_learned_conditioning(self, c):
        """Encode a list of prompts (or other conditioning) with the text encoder."""
        if hasattr(self.cond_stage_model, "encode"):
            return self.cond_stage_model.encode(c)
        return self.cond_stage_model(c)

    def on_train_batch_start(self, batch, batch_idx):
        if self.scale_by_std and self.global_step == 0 and batch_idx == 0 and not self.restarted_from_ckpt:
            x = self.get_input(batch, self.first_stage_key).to(self.device)
            z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
            self.scale_factor.copy_(1.0 / z.flatten().std())

    # ----- denoiser ---------------------------------------------------------------------------------------------
    def apply_model(self, x_noisy, t, cond):
        if isinstance(cond, dict):
            c_concat, c_crossattn = cond.get("c_concat"), cond.get("c_crossattn")
        else:
            cond = cond if isinstance(cond, (list, tuple)) else [cond]
            if self.model.conditioning_key == "concat":
                c_concat, c_crossattn = cond, None
            else:
                c_concat, c_crossattn = None, cond
        return self.model(x_noisy, t, c_concat=c_concat, c_crossattn=c_crossattn)

    def shared_step(self, batch):
        x = self.get_input(batch, self.first_stage_key).to(self.device)
        z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
        c = self.get_learned_conditioning(batch[self.cond_stage_key])
        if self.training and (self.truncation_dropout > 0 or self.word_dropout > 0):
            c = self.drop_context_tokens(c, batch[self.cond_stage_key])
        t = torch.randint(0, self.num_timesteps, (z.shape[0],), device=self.device).long()
        return self.p_losses(z, c, t)

    def drop_context_tokens(self, c: torch.Tensor, captions) -> torch.Tensor:
        """Base-model training options: encodings replaced by the empty caption's at the same positions.

        ``truncation_dropout``: that fraction of the captions is cut after a random word (uniform over its words):
        the words after it and every position from the EOS token on. ``word_dropout``: each word position on its
        own with that probability. Why: in a causal text encoder every token after a word holds that word, and the
        EOS/padding positions summarise the whole caption. A small UNet trained from scratch on full captions reads
        an object's shape from the tokens after its noun and from the summary, not from the noun itself (the noun
        alone gave 47 % right shapes on the toy base, the full caption 100 %). Perfusion edits the concept's own
        token, so the base model has to read an object at its noun, as Stable Diffusion does; a caption cut right
        after the noun, or missing its adjective, teaches exactly that."""
        encoder = self.cond_stage_model
        tokens = encoder.tokenize(list(captions)).to(c.device)
        first_eos = first_eos_positions(tokens, encoder.eos_token_id)
        n_words = (first_eos - 1).clamp(min=0)
        position = torch.arange(tokens.shape[1], device=c.device)[None]
        last_kept = 1 + (torch.rand(len(tokens), device=c.device) * n_words).long()  # cut after word 1..n_words
        truncate = torch.rand(len(tokens), device=c.device) < self.truncation_dropout
        drop_tail = truncate[:, None] & (position > torch.minimum(last_kept, n_words)[:, None])
        is_word = (position >= 1) & (position < first_eos[:, None])
        drop_word = is_word & (torch.rand(tokens.shape, device=c.device) < self.word_dropout)
        empty = self.get_learned_conditioning([""]).to(c.dtype)
        return torch.where((drop_tail | drop_word)[..., None], empty, c)

    def trainable_parameters(self):
        params = super().trainable_parameters()
        if self.cond_stage_trainable:
            params += [p for p in self.cond_stage_model.parameters() if p.requires_grad]
        return params

    def base_state_dict(self, use_ema: bool = True) -> dict[str, torch.Tensor]:
        """The base model in the original checkpoint layout (UNet, first stage, text encoder, noise schedule), EMA
        weights by default, without the EMA copies themselves: what ``init_from_ckpt`` loads."""
        ema_prefixes = tuple(f"{ema_name}." for ema_name, _ in EMA_OF)
        scope = self.ema_scope() if use_ema else contextlib.nullcontext()
        with scope:
            return {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith(ema_prefixes)}

    @torch.no_grad()
    def log_images(self, batch, N: int = 4, sample: bool = True, ddim_steps: int | None = None,
                   scale: float = 4.0, **kwargs):
        """Inputs, reconstructions and DDIM samples (EMA weights) of the batch's captions, with and without
        guidance."""
        from sgm.sampling import sample as sample_model

        N = min(N, len(batch[self.cond_stage_key]))
        x = self.get_input(batch, self.first_stage_key)[:N].to(self.device)
        z = self.get_first_stage_encoding(self.encode_first_stage(x))
        log = {"inputs": x, "reconstruction": self.decode_first_stage(z)}
        if not sample:
            return log
        generator = torch.Generator(device=self.device).manual_seed(0)
        x_T = torch.randn(z.shape, generator=generator, device=self.device)
        with self.ema_scope():
            c = self.get_learned_conditioning(list(batch[self.cond_stage_key])[:N])
            uc = self.get_learned_conditioning([""] * N)
            for label, guidance in (("samples", 1.0), (f"samples_scale{scale:g}", scale)):
                latents = sample_model(self, c, x_T, uc, steps=ddim_steps or 50, scale=guidance)
                log[label] = self.decode_first_stage(latents)
        return log
