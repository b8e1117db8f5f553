"""Side-by-side speed and memory measurements of Perfusion against its baselines, each measured in one run.

    python scripts/benchmark.py                      # all sections, SD1.5 architecture (random weights) + tiny
    python scripts/benchmark.py --train --json bench.json
    python scripts/benchmark.py --tiny --steps 1     # tiny models only (seconds; what the smoke test runs)

The default run (all sections, CPU) takes about 6 minutes on 2 idle cores, longer when other processes compete.

Sections (no section flag = all three):

--train          One optimizer step of Perfusion vs full fine-tuning (DreamBooth-style: every UNet weight trained
                 with AdamW) of the same UNet, same batch and resolution, with and without gradient checkpointing.
                 UNet level: latent (B, 4, H/f, W/f), random text context (B, 77, D). Perfusion: frozen UNet, edited
                 cross-attention K/V, AdamW over o*_V only, and the context requires grad (the gradient the word
                 embedding receives). Fused AdamW for both.
                 Memory: each variant in a fresh subprocess, warm-up step(s) + 1 step (the second step is the peak of
                 full fine-tuning: its backward refills gradients while AdamW's state exists). On CPU, resident memory:
                   peak_total = peak RSS during the steps - RSS before the model was built
                                (weights + gradients + optimizer state + activations: what training needs),
                   step_extra = peak RSS during the steps - RSS after the model was built
                                (what the steps add on top of holding the model).
                 The peak is read from VmHWM after resetting it once the model is built (/proc/self/clear_refs),
                 falling back to ru_maxrss.
                 Time: one more subprocess holds one UNet and runs the four variants (full / Perfusion x
                 checkpointing off / on, switched in place) round by round, so all see the same machine load; the
                 median of --steps rounds is reported, with CPU seconds (less sensitive to other processes) beside.
                 On CUDA: fp16 autocast, torch.cuda.max_memory_allocated, steps/s, and an estimate of a 400-step run
                 at batch 16 (micro-batches of --batch with gradient accumulation).
--unet-overhead  Plain UNet forward vs the personalized UNet forward (same weights; edited K/V with one concept, no
                 cache of any output: each edited layer folds the projection into its weight once per prompt), and
                 the personalized forward with that per-prompt work redone on every call (as in training, where
                 i* changes every step). Variants alternate; the median of N is reported.
--sample         A full DDIM sample (text encoding, N steps with classifier-free guidance, VAE decode) with our
                 LatentDiffusion + the sgm DDIM sampler (plain, and with a Perfusion concept swapped in) vs diffusers'
                 StableDiffusionPipeline assembled from the SAME checkpoint file. Same prompt, start noise and steps.

Real Stable Diffusion weights are not needed: timings do not depend on weight values, so the SD1.5-size models
are built from configs/stable-diffusion/v1-inference.yaml with seeded random weights. Every measurement runs in
its own subprocess, so an out-of-memory kill in one is reported and the others still run.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally; never reach for the hub

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from perfusion.roe import INFERENCE_BETA, INFERENCE_TAU, TRAIN_BETA, TRAIN_TAU  # noqa: E402

MODEL_CONFIGS = {
    "tiny": REPO_ROOT / "configs/tiny/sd1-tiny.yaml",
    "sd15": REPO_ROOT / "configs/stable-diffusion/v1-inference.yaml",
}
MODEL_LABELS = {"tiny": "tiny SD1", "sd15": "SD1.5"}
TRAIN_TIME_GOAL = TRAIN_MEMORY_GOAL = 0.35   # Perfusion step <= 0.35x full fine-tuning
UNET_OVERHEAD_GOAL = 0.015                   # personalized UNet forward <= 1.5% slower than plain (256 px; 1% at 512)
SAMPLE_RATIO_GOAL = 1.00                     # our full sample <= diffusers' time
RESULT_MARKER = "benchmark result"


# =============================================================================================================
# Small utilities
# =============================================================================================================

def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the tables and JSON lines."""
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    value = _proc_status_mb("VmRSS")
    if value is None:  # not Linux: the best we have is the peak so far
        value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024.0 if sys.platform != "darwin" else 2**20)
    return value


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb(was_reset: bool) -> float:
    """Peak RSS since the last reset (VmHWM), or since process start (ru_maxrss) when no reset was possible."""
    if was_reset:
        value = _proc_status_mb("VmHWM")
        if value is not None:
            return value
    scale = 2**20 if sys.platform == "darwin" else 1024.0  # ru_maxrss: bytes on macOS, kB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(seconds, result) of fn(), with the device synchronized on both ends."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def describe_error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    memory_error = isinstance(err, MemoryError) or "out of memory" in text.lower() or "can't allocate" in text
    if hasattr(torch, "OutOfMemoryError") and isinstance(err, torch.OutOfMemoryError):
        memory_error = True
    return ("out of memory: " if memory_error else "") + text.splitlines()[0][:500]


def median(values):
    return statistics.median(values) if values else float("nan")


# =============================================================================================================
# Models
# =============================================================================================================

def model_config(model: str):
    if model not in MODEL_CONFIGS:
        raise ValueError(f"unknown model '{model}' (use one of {sorted(MODEL_CONFIGS)})")
    return OmegaConf.load(MODEL_CONFIGS[model])


def latent_factor(config) -> int:
    """Image-to-latent downsampling of the config's autoencoder (8 for SD, 4 for the tiny model)."""
    return 2 ** (len(config.model.params.first_stage_config.params.ddconfig.ch_mult) - 1)


def check_image_size(model: str, size: int, flag: str = "--size") -> int:
    """Latent side for an image side, checked against the VAE and UNet downsampling; ``flag`` names the option."""
    config = model_config(model)
    factor = latent_factor(config)
    unet_params = config.model.params.unet_config.params
    unet_factor = 2 ** (len(unet_params.channel_mult) - 1)
    if size % (factor * unet_factor):
        raise ValueError(f"{flag} {size} does not fit {MODEL_LABELS[model]}: it must be a multiple of "
                         f"{factor * unet_factor} (VAE factor {factor} x UNet downsampling {unet_factor})")
    return size // factor


def build_unet(model: str, use_checkpoint: bool, seed: int):
    """The UNet of a config with seeded random weights; zero-initialised layers get small random values so that
    every branch computes something real (and outputs are not trivially zero)."""
    from tests._tiny_models import randomize_zero_parameters
    from ldm.util import instantiate_from_config

    unet_config = copy.deepcopy(model_config(model).model.params.unet_config)
    unet_config.params.use_checkpoint = bool(use_checkpoint)
    torch.manual_seed(seed)
    unet = instantiate_from_config(unet_config)
    randomize_zero_parameters(unet, torch.Generator().manual_seed(seed + 1))
    return unet, int(unet_config.params.context_dim)


def build_latent_diffusion(model: str, seed: int):
    """A whole LatentDiffusion (UNet, VAE, text encoder) of a config with seeded random weights, eval mode."""
    from tests._tiny_models import build_tiny_model, randomize_zero_parameters
    from ldm.util import instantiate_from_config

    if model == "tiny":
        return build_tiny_model("sd1", seed)
    torch.manual_seed(seed)
    ldm_model = instantiate_from_config(model_config(model).model)
    randomize_zero_parameters(ldm_model, torch.Generator().manual_seed(seed + 1))
    return ldm_model.eval()


def random_concept(width: int, generator: torch.Generator):
    """A stand-in concept: i*, C^-1 i* for a random SPD C^-1, and the super-class encoding i_super."""
    target_input = torch.randn(width, generator=generator)
    superclass_input = torch.randn(width, generator=generator)
    basis = torch.randn(width, width, generator=generator) / math.sqrt(width)
    c_inv = basis @ basis.T + 0.1 * torch.eye(width)
    return target_input, c_inv @ target_input, superclass_input


class PersonalizedUNet:
    """Perfusion's edited K/V projections for a UNet (one random concept), in named variants that can be switched
    in and out, so plain and personalized forwards use the very same weights and memory.

    Each variant (``add_variant``) has its own EditState; "plain" puts the original ``nn.Linear`` objects back.
    """

    def __init__(self, unet: torch.nn.Module, width: int, seed: int):
        attention = [m for m in unet.modules() if getattr(m, "is_cross_attention", False)]
        self.unet = unet
        self.variants = {"plain": [(m, name, getattr(m, name)) for m in attention for name in ("to_k", "to_v")]}
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self.target_input, self.c_inv_target_input, self.superclass_input = random_concept(width, generator)

    def add_variant(self, label: str, beta=INFERENCE_BETA, tau=INFERENCE_TAU):
        """Swap in edited layers sharing the UNet's weights; returns (EditState, {name: value layer})."""
        from perfusion.roe import EditState, edited_layers, swap_cross_attention_projections

        self.use("plain")
        state = EditState(beta=beta, tau=tau)
        swap_cross_attention_projections(self.unet, state)
        device = next(self.unet.parameters()).device
        state.set_targets(self.target_input[None].to(device), self.c_inv_target_input[None].to(device))
        generator = torch.Generator().manual_seed(self.seed + 1)  # same "trained" o*_V in every variant
        for layer in edited_layers(self.unet).values():
            layer.initialize_targets(self.superclass_input)      # o*_K lock; o*_V starts at W_V i_super
            if layer.role == "value":                             # a trained o*_V differs from its start
                noise = 0.1 * torch.randn(layer.target_output.shape, generator=generator)
                layer.set_target_outputs(layer.target_output + noise.to(layer.target_output))
        self.variants[label] = [(m, name, getattr(m, name)) for m, name, _ in self.variants["plain"]]
        return state, edited_layers(self.unet, "value")

    def use(self, label: str) -> None:
        for module, name, layer in self.variants[label]:
            setattr(module, name, layer)


# =============================================================================================================
# Workers (each runs in its own subprocess)
# =============================================================================================================

def _fused_adamw_supported(device: torch.device) -> bool:
    try:
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
        return True
    except (RuntimeError, ValueError, TypeError):
        return False


def set_gradient_checkpointing(unet: torch.nn.Module, enabled: bool) -> int:
    """Switch gradient checkpointing of a built UNet in place: the same flags that ``use_checkpoint`` in the UNet
    config sets (ResBlock.use_checkpoint, BasicTransformerBlock.checkpoint). Returns how many blocks it switched."""
    from ldm.modules.attention import BasicTransformerBlock
    from ldm.modules.diffusionmodules.openaimodel import ResBlock

    switched = 0
    for module in unet.modules():
        if isinstance(module, ResBlock):
            module.use_checkpoint, switched = bool(enabled), switched + 1
        elif isinstance(module, BasicTransformerBlock):
            module.checkpoint, switched = bool(enabled), switched + 1
    if not switched:
        raise RuntimeError("found no ResBlock/BasicTransformerBlock to switch gradient checkpointing on")
    return switched


TRAIN_MODES = ("full", "perfusion")


class TrainingSetup:
    """One UNet prepared for the training steps of the given modes, switchable in place (``use``):

    "full":      the original UNet, every weight trainable, fused AdamW over all of them (DreamBooth-style).
    "perfusion": the same weights frozen, edited K/V swapped in (training gate beta 0.75, tau 0.10), AdamW over o*_V;
                 the text context requires grad, standing in for the word embedding that Perfusion trains.
    Inputs per step: noisy latent (B, 4, H/f, W/f), random timestep, random context (B, 77, D), noise target.
    """

    def __init__(self, model: str, size: int, batch: int, device: torch.device, seed: int, modes=TRAIN_MODES,
                 checkpointing: bool = False):
        for mode in modes:
            if mode not in TRAIN_MODES:
                raise ValueError(f"unknown training mode '{mode}' (use {TRAIN_MODES})")
        self.device, self.batch, self.amp = device, batch, device.type == "cuda"
        self.latent = check_image_size(model, size)
        unet, self.width = build_unet(model, checkpointing, seed)
        self.unet = unet.to(device).train()
        self.base_parameters = list(self.unet.parameters())
        self.generator = torch.Generator().manual_seed(seed + 2)
        self.personalized = None
        self.trainable = {}
        if "perfusion" in modes:
            self.personalized = PersonalizedUNet(self.unet, self.width, seed + 3)
            self.state, value_layers = self.personalized.add_variant("perfusion", beta=TRAIN_BETA, tau=TRAIN_TAU)
            self.trainable["perfusion"] = [layer.target_output for layer in value_layers.values()]
            self.target_input = self.personalized.target_input.to(device)
            self.c_inv_target_input = self.personalized.c_inv_target_input.to(device)
        if "full" in modes:
            self.trainable["full"] = self.base_parameters
        # fused AdamW (one kernel over all tensors, CPU and CUDA) is what a fast full fine-tuning run uses; the
        # per-tensor loop would inflate the baseline's optimizer time
        self.fused = _fused_adamw_supported(device)
        options = {"fused": True} if self.fused else {}
        self.optimizers = {mode: torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, **options)
                           for mode, params in self.trainable.items()}
        self.scalers = {mode: torch.amp.GradScaler(device.type, enabled=self.amp) for mode in self.trainable}
        self.mode = None
        self.use(modes[0], checkpointing)

    def use(self, mode: str, checkpointing: bool) -> None:
        if mode not in self.trainable:
            raise ValueError(f"this setup was built for {sorted(self.trainable)}, not '{mode}'")
        set_gradient_checkpointing(self.unet, checkpointing)
        if self.personalized is not None:
            self.personalized.use("perfusion" if mode == "perfusion" else "plain")
        for parameter in self.base_parameters:
            parameter.requires_grad_(mode == "full")
        for parameter in self.trainable.get("perfusion", []):
            parameter.requires_grad_(mode == "perfusion")
        self.mode = mode

    def step(self) -> dict:
        """One optimizer step in the current mode: seconds of forward+backward and of the optimizer, CPU seconds."""
        mode, device, g = self.mode, self.device, self.generator
        x = torch.randn(self.batch, 4, self.latent, self.latent, generator=g).to(device)
        noise = torch.randn(x.shape, generator=g).to(device)
        t = torch.randint(0, 1000, (self.batch,), generator=g).to(device)
        context = torch.randn(self.batch, 77, self.width, generator=g).to(device).requires_grad_(mode == "perfusion")
        optimizer, scaler = self.optimizers[mode], self.scalers[mode]

        def forward_backward():
            if mode == "perfusion":  # the per-step EMA update of i* (Perfusion.update_target_input) re-keys the state
                self.state.set_targets(self.target_input[None], self.c_inv_target_input[None])
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=self.amp):
                prediction = self.unet(x + noise, t, context)
            loss = F.mse_loss(prediction.float(), noise)
            scaler.scale(loss).backward()
            return loss

        def optimizer_step():
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        cpu_start = time.process_time()
        fwd_bwd_s, loss = timed(forward_backward, device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{mode} training loss is {loss.item()} (random weights overflowed?)")
        context_grad_norm = float(context.grad.norm()) if mode == "perfusion" else None
        if mode == "perfusion" and not context_grad_norm > 0:
            raise RuntimeError("no gradient reached the text context: the word embedding would not train")
        if any(p.grad is None for p in self.trainable[mode]):
            raise RuntimeError(f"{mode}: some trainable tensors received no gradient")
        optimizer_s, _ = timed(optimizer_step, device)
        return {"fwd_bwd_s": fwd_bwd_s, "optimizer_s": optimizer_s, "step_s": fwd_bwd_s + optimizer_s,
                "cpu_s": time.process_time() - cpu_start, "context_grad_norm": context_grad_norm}


def _summarize_steps(records: list[dict]) -> dict:
    summary = {name: median([r[name] for r in records]) for name in ("step_s", "fwd_bwd_s", "optimizer_s", "cpu_s")}
    summary["all_step_s"] = [r["step_s"] for r in records]
    return summary


def train_memory_worker(spec: dict) -> dict:
    """Peak memory of one variant (its own fresh process), plus the step times seen there ("alone")."""
    device = torch.device(spec["device"])
    mode, checkpointing = spec["mode"], spec["checkpointing"]
    rss_start = rss_mb()
    log(f"train memory: building the {MODEL_LABELS[spec['model']]} UNet for {mode} training, checkpointing "
        f"{'on' if checkpointing else 'off'}")
    setup = TrainingSetup(spec["model"], spec["size"], spec["batch"], device, spec["seed"], (mode,), checkpointing)
    gc.collect()
    rss_built = rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda_built = torch.cuda.memory_allocated(device)
    peak_was_reset = reset_peak_rss()
    # The second step is the peak of full fine-tuning: its backward fills gradients while AdamW's state exists.
    warmup, steps = spec["warmup"], max(1, spec["steps"])
    records = [setup.step() for _ in tqdm(range(warmup + steps), desc=f"{mode} steps", file=sys.stderr)]
    peak = peak_rss_mb(peak_was_reset)
    timing = _summarize_steps(records[warmup:])
    result = {
        "trainable_params": sum(p.numel() for p in setup.trainable[mode]), "fused_adamw": setup.fused,
        "alone_step_s": timing["step_s"], "alone_cpu_s": timing["cpu_s"],
        "rss_model_mb": rss_built - rss_start, "peak_total_mb": peak - rss_start, "step_extra_mb": peak - rss_built,
        "peak_source": "VmHWM reset after build" if peak_was_reset else "ru_maxrss (whole process)",
        "context_grad_norm": records[-1]["context_grad_norm"],
    }
    if device.type == "cuda":
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["cuda_step_extra_mb"] = (torch.cuda.max_memory_allocated(device) - cuda_built) / 2**20
    return result


def train_timing_worker(spec: dict) -> dict:
    """Step times of all four variants (full / Perfusion x checkpointing off / on) in one process, interleaved
    round by round, so that every variant sees the same machine load."""
    device = torch.device(spec["device"])
    log(f"train timing: building the {MODEL_LABELS[spec['model']]} UNet for all four variants")
    setup = TrainingSetup(spec["model"], spec["size"], spec["batch"], device, spec["seed"], TRAIN_MODES)
    variants = [(checkpointing, mode) for checkpointing in (False, True) for mode in TRAIN_MODES]
    for checkpointing, mode in tqdm(variants, desc="warm-up step per variant", file=sys.stderr):
        setup.use(mode, checkpointing)
        for _ in range(spec["warmup"]):
            setup.step()
    records = {variant: [] for variant in variants}
    for round_index in tqdm(range(spec["steps"]), desc="timed rounds of 4 steps", file=sys.stderr):
        for checkpointing, mode in (variants if round_index % 2 == 0 else variants[::-1]):
            setup.use(mode, checkpointing)
            records[(checkpointing, mode)].append(setup.step())
    result = {"variants": []}
    for (checkpointing, mode), steps in records.items():
        timing = {"checkpointing": checkpointing, "mode": mode, **_summarize_steps(steps)}
        timing["steps_per_s"] = 1.0 / timing["step_s"] if timing["step_s"] > 0 else None
        if device.type == "cuda":
            accumulation = max(1, 16 // spec["batch"])
            timing["grad_accumulation"] = accumulation
            timing["estimate_400_steps_batch16_s"] = 400 * (accumulation * timing["fwd_bwd_s"] + timing["optimizer_s"])
        result["variants"].append(timing)
    return result


@torch.no_grad()
def unet_overhead_worker(spec: dict) -> dict:
    """Median forward time of the plain UNet vs the personalized UNet (per-prompt work done once / every call),
    alternating."""
    device = torch.device(spec["device"])
    model, batch, seed, repeats = spec["model"], spec["batch"], spec["seed"], spec["repeats"]
    latent = check_image_size(model, spec["size"])
    log(f"unet-overhead: building the {MODEL_LABELS[model]} UNet")
    unet, width = build_unet(model, False, seed)
    unet = unet.to(device).eval()
    personalized = PersonalizedUNet(unet, width, seed + 3)
    personalized.add_variant("personalized")
    every_call_state, _ = personalized.add_variant("personalized_every_call")
    generator = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(batch, 4, latent, latent, generator=generator).to(device)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    context = torch.randn(batch, 77, width, generator=generator)
    context[:, 5] = personalized.target_input  # the concept word's encoding sits in the prompt
    context = context.to(device)

    def run(variant):
        personalized.use(variant)
        if variant == "personalized_every_call":
            every_call_state.set_gating(INFERENCE_BETA, INFERENCE_TAU)  # a new state: edited weights are rebuilt
        return unet(x, t, context)

    variants = ("plain", "personalized", "personalized_every_call")
    times = {v: [] for v in variants}
    cpu_times = {v: [] for v in variants}  # CPU seconds: less sensitive than wall time to other processes
    outputs = {}
    for v in variants:  # warm-up (and the personalized variant's once-per-prompt edited weights)
        outputs[v] = timed(lambda: run(v), device)[1]
    for _ in tqdm(range(repeats), desc=f"{MODEL_LABELS[model]} UNet forwards x{len(variants)}", file=sys.stderr):
        for v in variants:
            cpu_start = time.process_time()
            times[v].append(timed(lambda: run(v), device)[0])
            cpu_times[v].append(time.process_time() - cpu_start)
    plain = median(times["plain"])
    return {
        "model": model, "device": device.type, "size": spec["size"], "batch": batch, "repeats": repeats,
        "plain_s": plain, "personalized_s": median(times["personalized"]),
        "personalized_every_call_s": median(times["personalized_every_call"]),
        "overhead": median(times["personalized"]) / plain - 1.0,
        "overhead_every_call": median(times["personalized_every_call"]) / plain - 1.0,
        "overhead_cpu": median(cpu_times["personalized"]) / median(cpu_times["plain"]) - 1.0,
        "all_s": times, "all_cpu_s": cpu_times,
        # the edit must change the output, else the personalized variant timed nothing real
        "edit_changes_output": float((outputs["personalized"] - outputs["plain"]).abs().max()),
        "every_call_matches": float((outputs["personalized"] - outputs["personalized_every_call"]).abs().max()),
    }


def build_diffusers_pipeline(checkpoint: Path, config_path: Path, ours, device: torch.device):
    """StableDiffusionPipeline from our checkpoint file: UNet and VAE converted by diffusers, the CLIP text model
    (a copy of the checkpoint's text weights, already loaded in ours) and our tokenizer, DDIM with SD settings."""
    import diffusers

    unet = diffusers.UNet2DConditionModel.from_single_file(str(checkpoint), original_config=str(config_path))
    vae = diffusers.AutoencoderKL.from_single_file(str(checkpoint), original_config=str(config_path))
    text_encoder = copy.deepcopy(ours.cond_stage_model.transformer.text_model)
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading",
        prediction_type="epsilon")
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=ours.cond_stage_model.tokenizer,
        unet=unet.eval(), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def sample_worker(spec: dict) -> dict:
    """Seconds for one full text-to-image sample: ours (plain and personalized) vs diffusers, same checkpoint."""
    from ldm.util import save_state_dict
    from sgm.sampling import sample as sample_model

    device = torch.device(spec["device"])
    model_name, seed, steps, scale, prompt = spec["model"], spec["seed"], spec["steps"], spec["scale"], spec["prompt"]
    latent = check_image_size(model_name, spec["size"])
    log(f"sample: building the {MODEL_LABELS[model_name]} LatentDiffusion with random weights")
    ours = build_latent_diffusion(model_name, seed)
    workdir = Path(tempfile.mkdtemp(prefix="perfusion-benchmark-", dir=spec.get("tmpdir")))
    try:
        checkpoint = workdir / "model.safetensors"
        log(f"sample: writing the checkpoint {checkpoint}")
        save_state_dict(ours.state_dict(), checkpoint)
        checkpoint_mb = checkpoint.stat().st_size / 2**20
        log("sample: building diffusers' StableDiffusionPipeline from the same checkpoint")
        pipe = build_diffusers_pipeline(checkpoint, MODEL_CONFIGS[model_name], ours, device)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # the SD1.5 file is ~4 GB: never leave it behind
    ours = ours.to(device)
    personalized = PersonalizedUNet(ours.model.diffusion_model, ours.cond_stage_model.width, seed + 3)
    personalized.add_variant("perfusion")
    x_T = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(seed + 4)).to(device)

    def ours_sample(personalize: bool, n_steps: int):
        personalized.use("perfusion" if personalize else "plain")
        c = ours.get_learned_conditioning([prompt])
        uc = ours.get_learned_conditioning([""])
        latents = sample_model(ours, c, x_T.clone(), uc, steps=n_steps, scale=scale)
        return ((ours.decode_first_stage(latents) + 1.0) / 2.0).clamp(0.0, 1.0)

    def diffusers_sample(n_steps: int):
        size = spec["size"]
        return pipe(prompt, height=size, width=size, num_inference_steps=n_steps, guidance_scale=scale, eta=0.0,
                    latents=x_T.clone(), output_type="pt").images

    variants = {"ours": lambda n: ours_sample(False, n), "ours_perfusion": lambda n: ours_sample(True, n),
                "diffusers": diffusers_sample}
    for _ in range(spec["warmup"]):  # one-step runs: first-call allocations and kernel setup are not timed
        for name, fn in variants.items():
            fn(1)
    times = {name: [] for name in variants}
    images = {}
    order = list(variants)
    for repeat in tqdm(range(spec["repeats"]), desc=f"{MODEL_LABELS[model_name]} samples x{len(variants)}",
                       file=sys.stderr):
        for name in (order if repeat % 2 == 0 else order[::-1]):  # alternate the order against drift
            seconds, images[name] = timed(lambda: variants[name](steps), device)
            times[name].append(seconds)
    diffusers_s = median(times["diffusers"])
    return {
        "model": model_name, "device": device.type, "size": spec["size"], "steps": steps, "scale": scale,
        "repeats": spec["repeats"], "checkpoint_mb": checkpoint_mb,
        "ours_s": median(times["ours"]), "ours_perfusion_s": median(times["ours_perfusion"]),
        "diffusers_s": diffusers_s, "all_s": times,
        "ours_over_diffusers": median(times["ours"]) / diffusers_s,
        "perfusion_over_diffusers": median(times["ours_perfusion"]) / diffusers_s,
        # same checkpoint, noise and schedule: the images must agree (shows both timed the same computation)
        "max_abs_image_diff_ours_vs_diffusers": float((images["ours"].cpu() - images["diffusers"].cpu()).abs().max()),
        "max_abs_image_diff_perfusion_vs_ours": float((images["ours_perfusion"] - images["ours"]).abs().max()),
    }


WORKERS = {"train-memory": train_memory_worker, "train-timing": train_timing_worker,
           "unet-overhead": unet_overhead_worker, "sample": sample_worker}


def run_worker_main(job: str, spec_json: str, result_path: str) -> int:
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    try:
        result = WORKERS[job](spec)
        code = 0
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which carries on with other variants
        traceback.print_exc(file=sys.stderr)
        result, code = {"error": describe_error(err)}, 1
    result["load_average_end"] = load_average()
    Path(result_path).write_text(json.dumps(result))
    return code


def run_in_subprocess(job: str, spec: dict, timeout_s: float | None) -> dict:
    """Run one measurement in a fresh Python process; errors, crashes and OOM kills come back as {"error": ...}."""
    with tempfile.TemporaryDirectory(prefix="perfusion-benchmark-result-") as folder:
        result_path = Path(folder) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", job, "--spec", json.dumps(spec),
                   "--result", str(result_path)]
        load_start = load_average()
        try:
            # the worker's prints go to our stderr, keeping our stdout for tables and JSON
            completed = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr, timeout=timeout_s,
                                       cwd=str(REPO_ROOT))
            returncode = completed.returncode
        except subprocess.TimeoutExpired:
            return {**spec, "error": f"timed out after {timeout_s:.0f} s (raise --timeout)", "load_average_start": load_start}
        if result_path.is_file():
            result = json.loads(result_path.read_text())
        elif returncode < 0:
            signal_note = " (SIGKILL: on Linux usually the out-of-memory killer)" if returncode == -9 else ""
            result = {"error": f"worker killed by signal {-returncode}{signal_note}"}
        else:
            result = {"error": f"worker exited with status {returncode} without a result"}
    return {**spec, **result, "load_average_start": load_start}


# =============================================================================================================
# Sections (parent process)
# =============================================================================================================

def fmt(value, digits=3, suffix=""):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    print(flush=True)


def ratio(numerator, denominator):
    if numerator is None or denominator in (None, 0) or not math.isfinite(denominator):
        return None
    return numerator / denominator


def common_spec(args, model: str) -> dict:
    # Tiny models are all per-operation overhead; several threads there measure mostly thread wake-ups, and
    # nothing but noise when other processes share the cores.
    threads = args.tiny_threads if model == "tiny" else args.threads
    return {"device": args.device, "threads": threads, "seed": args.seed}


def models_for(args, include_tiny: bool) -> list[str]:
    if args.tiny:
        return ["tiny"]
    return (["tiny"] if include_tiny else []) + ["sd15"]


def size_for(args, model: str) -> int:
    if model == "tiny":
        return args.tiny_size
    return args.size or (512 if args.device.startswith("cuda") else 256)


def section_train(args) -> dict:
    model = models_for(args, include_tiny=False)[0]
    size = size_for(args, model)
    batch = args.batch or (4 if args.device.startswith("cuda") else 1)
    cuda = args.device.startswith("cuda")
    base = {**common_spec(args, model), "model": model, "size": size, "batch": batch, "warmup": args.warmup_steps}
    rows = []
    for checkpointing in (False, True):
        for mode in TRAIN_MODES:
            log(f"train memory: {MODEL_LABELS[model]} {size}px batch {batch}, {mode}, checkpointing {checkpointing}")
            row = run_in_subprocess("train-memory", {**base, "mode": mode, "checkpointing": checkpointing,
                                                     "steps": 1}, args.timeout)
            if "error" in row:
                log(f"train memory: {mode} failed: {row['error']}")
            rows.append(row)
    log(f"train timing: all four variants interleaved, {args.steps} timed round(s)")
    timing = run_in_subprocess("train-timing", {**base, "steps": args.steps}, args.timeout)
    if "error" in timing:
        log(f"train timing failed ({timing['error']}); reporting the times of the memory runs instead")
    timed_variants = {(v["checkpointing"], v["mode"]): v for v in timing.get("variants", [])}
    for row in rows:
        interleaved = timed_variants.get((row["checkpointing"], row["mode"]))
        if interleaved is not None:
            row.update({k: v for k, v in interleaved.items() if k not in ("checkpointing", "mode")})
            row["timing"] = "interleaved"
        elif "alone_step_s" in row:
            row.update(step_s=row["alone_step_s"], cpu_s=row["alone_cpu_s"], timing="alone")
    ratios = {}
    for checkpointing in (False, True):
        full, perf = (next(r for r in rows if r["checkpointing"] == checkpointing and r["mode"] == m)
                      for m in ("full", "perfusion"))
        key = f"checkpointing_{'on' if checkpointing else 'off'}"
        ratios[key] = {
            "time": ratio(perf.get("step_s"), full.get("step_s")),
            "cpu_time": ratio(perf.get("cpu_s"), full.get("cpu_s")),
            "time_alone": ratio(perf.get("alone_step_s"), full.get("alone_step_s")),
            "peak_memory": ratio(perf.get("peak_total_mb"), full.get("peak_total_mb")),
            "step_memory": ratio(perf.get("step_extra_mb"), full.get("step_extra_mb")),
        }
        if cuda:
            ratios[key]["cuda_max_allocated"] = ratio(perf.get("cuda_max_allocated_mb"), full.get("cuda_max_allocated_mb"))
    header = (["checkpointing", "variant", "trainable params", "s/step", "CPU s/step", "fwd+bwd s", "optimizer s",
               "s/step alone", "peak total MiB", "step extra MiB"]
              + (["steps/s", "cuda max alloc MiB", "est. 400x16 s"] if cuda else []) + ["load (memory run)"])
    table = []
    for row in rows:
        label = ["on" if row["checkpointing"] else "off", row["mode"]]
        if "error" in row:
            table.append(label + ["error: " + row["error"]] + [""] * (len(header) - 3))
            continue
        table.append(label + [f"{row['trainable_params']:,}", fmt(row.get("step_s"), 2), fmt(row.get("cpu_s"), 2),
                              fmt(row.get("fwd_bwd_s"), 2), fmt(row.get("optimizer_s"), 2),
                              fmt(row.get("alone_step_s"), 2), fmt(row["peak_total_mb"], 0),
                              fmt(row["step_extra_mb"], 0)]
                     + ([fmt(row.get("steps_per_s"), 2), fmt(row.get("cuda_max_allocated_mb"), 0),
                         fmt(row.get("estimate_400_steps_batch16_s"), 0)] if cuda else [])
                     + [f"{row.get('load_average_start')}->{row.get('load_average_end')}"])
    for key, values in ratios.items():
        table.append([key.split("_")[-1], "**perfusion / full**", "", fmt(values["time"], 3),
                      fmt(values["cpu_time"], 3), "", "", fmt(values["time_alone"], 3),
                      fmt(values["peak_memory"], 3), fmt(values["step_memory"], 3)]
                     + (["", fmt(values.get("cuda_max_allocated"), 3), ""] if cuda else []) + [""])
    timing_note = ("times interleaved in one process" if "error" not in timing
                   else "times from the separate memory runs (interleaved timing failed)")
    print_table(f"Training step: Perfusion vs full fine-tuning, {MODEL_LABELS[model]} UNet, {size}px, batch {batch}, "
                f"{args.device}, {base['threads']} threads, {timing_note} (goal: ratio <= {TRAIN_TIME_GOAL})",
                header, table)
    summary = {"section": "train", "model": model, "size": size, "batch": batch, "device": args.device,
               "goal": TRAIN_TIME_GOAL, "ratios": ratios}
    print(json.dumps(summary), flush=True)
    return {**summary, "rows": rows, "timing_run": timing}


def section_unet_overhead(args) -> dict:
    rows, ratios = [], {}
    for model in models_for(args, include_tiny=True):
        size = size_for(args, model)
        repeats = args.tiny_repeats if model == "tiny" else args.repeats
        batch = args.batch or 1
        log(f"unet-overhead: {MODEL_LABELS[model]} {size}px batch {batch}, median of {repeats}")
        spec = {**common_spec(args, model), "model": model, "size": size, "batch": batch, "repeats": repeats}
        row = run_in_subprocess("unet-overhead", spec, args.timeout)
        rows.append(row)
        ratios[model] = {"overhead": row.get("overhead"), "overhead_every_call": row.get("overhead_every_call"),
                         "overhead_cpu_time": row.get("overhead_cpu"),
                         "personalized_over_plain": ratio(row.get("personalized_s"), row.get("plain_s"))}
    header = ["model", "threads", "px", "batch", "N", "plain s", "personalized s", "overhead",
              "overhead (CPU s)", "rebuilt every call s", "overhead every call", "load"]
    table = []
    for row in rows:
        if "error" in row:
            table.append([MODEL_LABELS[row["model"]], row["threads"], row["size"], row["batch"], "error: " + row["error"]]
                         + [""] * (len(header) - 5))
            continue
        table.append([MODEL_LABELS[row["model"]], row["threads"], row["size"], row["batch"], row["repeats"],
                      fmt(row["plain_s"], 4),
                      fmt(row["personalized_s"], 4), fmt(100 * row["overhead"], 1, "%"),
                      fmt(100 * row["overhead_cpu"], 1, "%"),
                      fmt(row["personalized_every_call_s"], 4), fmt(100 * row["overhead_every_call"], 1, "%"),
                      f"{row.get('load_average_start')}->{row.get('load_average_end')}"])
    print_table(f"UNet forward: personalized vs plain, {args.device}, median "
                f"(goal: overhead <= {UNET_OVERHEAD_GOAL:.1%})", header, table)
    summary = {"section": "unet_overhead", "device": args.device, "goal": UNET_OVERHEAD_GOAL, "ratios": ratios}
    print(json.dumps(summary), flush=True)
    return {**summary, "rows": rows}


def section_sample(args) -> dict:
    rows, ratios = [], {}
    for model in models_for(args, include_tiny=True):
        size = size_for(args, model)
        repeats = args.tiny_repeats if model == "tiny" else args.sample_repeats
        log(f"sample: {MODEL_LABELS[model]} {size}px, {args.sample_steps} DDIM steps, CFG {args.scale}, "
            f"median of {repeats}")
        # the parent owns the checkpoint folder, so it is deleted even when the worker is killed
        with tempfile.TemporaryDirectory(prefix="perfusion-benchmark-", dir=args.tmpdir) as folder:
            spec = {**common_spec(args, model), "model": model, "size": size, "steps": args.sample_steps,
                    "scale": args.scale, "prompt": args.prompt, "repeats": repeats,
                    "warmup": 1 if model == "tiny" else args.sample_warmup, "tmpdir": folder}
            row = run_in_subprocess("sample", spec, args.timeout)
        row.pop("tmpdir", None)
        rows.append(row)
        ratios[model] = {"ours_over_diffusers": row.get("ours_over_diffusers"),
                         "perfusion_over_diffusers": row.get("perfusion_over_diffusers")}
    header = ["model", "threads", "px", "steps", "N", "ours s", "ours+Perfusion s", "diffusers s", "ours/diffusers",
              "Perfusion/diffusers", "max image diff", "load"]
    table = []
    for row in rows:
        if "error" in row:
            table.append([MODEL_LABELS[row["model"]], row["threads"], row["size"], row["steps"], "error: " + row["error"]]
                         + [""] * (len(header) - 5))
            continue
        table.append([MODEL_LABELS[row["model"]], row["threads"], row["size"], row["steps"], row["repeats"],
                      fmt(row["ours_s"], 3),
                      fmt(row["ours_perfusion_s"], 3), fmt(row["diffusers_s"], 3),
                      fmt(row["ours_over_diffusers"], 3), fmt(row["perfusion_over_diffusers"], 3),
                      f"{row['max_abs_image_diff_ours_vs_diffusers']:.1e}",
                      f"{row.get('load_average_start')}->{row.get('load_average_end')}"])
    print_table(f"Full DDIM sample (text encoder + UNet x steps with CFG {args.scale} + VAE decode), {args.device} "
                f"(goal: ours/diffusers <= {SAMPLE_RATIO_GOAL:.2f})", header, table)
    summary = {"section": "sample", "device": args.device, "goal": SAMPLE_RATIO_GOAL, "ratios": ratios}
    print(json.dumps(summary), flush=True)
    return {**summary, "rows": rows}


SECTIONS = {"train": section_train, "unet_overhead": section_unet_overhead, "sample": section_sample}


def environment(args) -> dict:
    cpu = None
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), None)
    except OSError:
        pass
    info = {"torch": torch.__version__, "python": sys.version.split()[0], "cpu": cpu, "cpu_count": os.cpu_count(),
            "threads": args.threads, "tiny_threads": args.tiny_threads, "device": args.device, "load_average_start": load_average()}
    if args.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return info


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help="Perfusion vs full fine-tuning step (time, peak memory)")
    p.add_argument("--unet-overhead", dest="unet_overhead", action="store_true",
                   help="personalized vs plain UNet forward")
    p.add_argument("--sample", action="store_true", help="full DDIM sample: ours vs diffusers' pipeline")
    p.add_argument("--tiny", action="store_true", help="tiny models only (seconds; for tests)")
    p.add_argument("--size", type=int, default=None, help="image side for SD1.5 (default 256 on CPU, 512 on CUDA)")
    p.add_argument("--tiny-size", dest="tiny_size", type=int, default=32, help="image side for the tiny model")
    p.add_argument("--batch", type=int, default=None, help="training/UNet batch (default 1 on CPU, 4 on CUDA training)")
    p.add_argument("--steps", type=int, default=2,
                   help="timed training rounds; each times one step of every variant, in alternating order (median)")
    p.add_argument("--warmup-steps", dest="warmup_steps", type=int, default=1,
                   help="untimed training steps per variant first (the first allocates AdamW's state)")
    p.add_argument("--repeats", type=int, default=3, help="SD1.5 UNet forwards per variant (median)")
    p.add_argument("--tiny-repeats", dest="tiny_repeats", type=int, default=20,
                   help="repeats for tiny-model forwards and samples (median)")
    p.add_argument("--sample-steps", dest="sample_steps", type=int, default=5, help="DDIM steps per sample")
    p.add_argument("--sample-repeats", dest="sample_repeats", type=int, default=1, help="SD1.5 samples per variant")
    p.add_argument("--sample-warmup", dest="sample_warmup", type=int, default=1,
                   help="untimed one-step SD1.5 samples per variant first")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--prompt", type=str, default="a photo of a teddy bear on the beach")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads for SD1.5 sizes")
    p.add_argument("--tiny-threads", dest="tiny_threads", type=int, default=1, help="torch CPU threads for tiny models")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed for each measurement subprocess")
    p.add_argument("--tmpdir", type=str, default=None,
                   help="folder for the temporary checkpoint of --sample (SD1.5: ~4 GB, deleted afterwards)")
    p.add_argument("--json", type=str, default=None, help="write all results to this JSON file")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def check_arguments(parser: argparse.ArgumentParser, args) -> None:
    for name in ("steps", "repeats", "tiny_repeats", "sample_steps", "sample_repeats", "threads", "tiny_threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_steps", "sample_warmup"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    try:
        for model in models_for(args, include_tiny=True):
            check_image_size(model, size_for(args, model), "--tiny-size" if model == "tiny" else "--size")
    except ValueError as err:
        parser.error(str(err))


def main(argv=None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.worker:
        if not args.spec or not args.result:
            parser.error("--worker needs --spec and --result")
        return run_worker_main(args.worker, args.spec, args.result)
    check_arguments(parser, args)
    chosen = [name for name in SECTIONS if getattr(args, name)] or list(SECTIONS)
    results = {"environment": environment(args), "sections": {}}
    start = time.perf_counter()
    for name in chosen:
        section_start = time.perf_counter()
        try:
            results["sections"][name] = SECTIONS[name](args)
        except Exception as err:  # noqa: BLE001 - one broken section must not lose the others
            traceback.print_exc(file=sys.stderr)
            results["sections"][name] = {"section": name, "error": describe_error(err)}
            print(json.dumps(results["sections"][name]), flush=True)
        results["sections"][name]["wall_s"] = time.perf_counter() - section_start
        log(f"{name}: done in {results['sections'][name]['wall_s']:.0f} s")
    results["environment"]["load_average_end"] = load_average()
    results["wall_s"] = time.perf_counter() - start
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
        log(f"results written to {args.json}")
    log(f"all sections done in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
