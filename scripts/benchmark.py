"""Side-by-side speed and memory measurements of Perfusion against its baselines, each measured in one run.

    python scripts/benchmark.py                      # all sections, SD1.5 architecture (random weights) + tiny
    python scripts/benchmark.py --train --json bench.json
    python scripts/benchmark.py --tiny --steps 1     # tiny models only (seconds; what the smoke test runs)

--train          One training step of one UNet (same batch and size; gradient checkpointing off and on) for
                   full:      DreamBooth-style fine-tuning, every UNet weight trained with fused AdamW;
                   perfusion: frozen UNet, edited cross-attention K/V, AdamW over o*_V, the context requiring grad;
                   floor:     frozen UNet forward + backward to its context only (no weight gradient, no optimizer):
                              what any method training only the text side or a few K/V vectors must pay.
                 Memory: each variant in a fresh subprocess, warm-up + 1 step; peak_total / step_extra = peak RSS
                 (VmHWM, reset after the build) minus RSS before / after building the model. Time: one subprocess
                 switches one UNet between all variants round by round; median of --steps rounds, CPU s beside.
                 CUDA: fp16 autocast, torch.cuda.max_memory_allocated, an estimate of 400 steps at batch 16.
--unet-overhead  Plain UNet forward vs the personalized one (edited K/V, one concept, no output cache: each edited
                 layer folds its weight once per EditState change) and with that rebuild forced on every call.
--sample         A full DDIM sample (text encoding, steps with CFG, VAE decode): our LatentDiffusion with
                 sgm.sampling.sample (plain and with a concept) vs diffusers' StableDiffusionPipeline built from the
                 same checkpoint file; same prompt, noise and steps.

--training-extras  What a default Perfusion run (configs/perfusion_teddy.yaml: 400 steps x 4 micro-batches of 4) spends
                 besides its training steps, from primitives timed in one process at the same size: the VAE encoder
                 (saved per micro-batch by cached latents), a frozen-UNet forward + backward (one micro-batch), UNet
                 forwards at the logging batches and the VAE decoder. Logging then costs: validation prompts
                 (perfusion/validation.py; P prompts x K betas, S guided steps, every N steps) against the previous
                 default (image logger sampling 4 captions at 50 DDIM steps unguided and guided every 25 steps).

No section flag runs all four. Models have seeded random weights (timings do not depend on their values); each
measurement runs in its own subprocess, so an out-of-memory kill is reported and the others still run.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from statistics import median

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally; never reach for the hub

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from perfusion.roe import INFERENCE_BETA, INFERENCE_TAU, TRAIN_BETA, TRAIN_TAU  # noqa: E402

MODEL_CONFIGS = {"tiny": REPO_ROOT / "configs/tiny/sd1-tiny.yaml",
                 "sd15": REPO_ROOT / "configs/stable-diffusion/v1-inference.yaml"}
MODEL_LABELS = {"tiny": "tiny SD1", "sd15": "SD1.5"}
TRAIN_MODES = ("full", "perfusion", "floor")
TRAIN_TIME_GOAL = 0.35        # Perfusion step <= 0.35x full fine-tuning
UNET_OVERHEAD_GOAL = 0.015    # personalized UNet forward <= 1.5% slower than plain
SAMPLE_RATIO_GOAL = 1.00      # our full sample <= diffusers' time
VALIDATION_SHARE_GOAL = 0.10  # validation prompts <= 10% of a default 400-step run


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the tables and JSON lines."""
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def memory_mb(field: str = "VmRSS") -> float:
    """VmRSS (now) or VmHWM (peak since the last reset_peak_rss) in MiB; without /proc, the process's peak RSS."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) / 1024.0 for line in fh if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024.0)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            return fh.write("5") > 0
    except OSError:
        return False


def timed(fn, device: torch.device):
    """The timing harness: (wall s, CPU s, fn()) with the device synchronized on both ends."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _: None)
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def interleaved(run, names: list, repeats: int, desc: str) -> dict:
    """{name: [run(name) of each round]} over ``repeats`` rounds, the order alternating against drift."""
    records = {name: [] for name in names}
    for index in tqdm(range(repeats), desc=desc, file=sys.stderr):
        for name in (names if index % 2 == 0 else names[::-1]):
            records[name].append(run(name))
    return records


def load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def describe_error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    oom = isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in text.lower()
    return ("out of memory: " if oom else "") + text.splitlines()[0][:500]


def ratio(numerator, denominator):
    return None if numerator is None or not denominator or not math.isfinite(denominator) else numerator / denominator


def config_params(model: str, part: str = "unet_config"):
    return OmegaConf.load(MODEL_CONFIGS[model]).model.params[part].params


def check_image_size(model: str, size: int, flag: str = "--size") -> int:
    """Latent side for an image side, checked against the VAE and UNet downsampling; ``flag`` names the option."""
    factor = 2 ** (len(config_params(model, "first_stage_config").ddconfig.ch_mult) - 1)
    unet_factor = 2 ** (len(config_params(model).channel_mult) - 1)
    if size % (factor * unet_factor):
        raise ValueError(f"{flag} {size} does not fit {MODEL_LABELS[model]}: it must be a multiple of "
                         f"{factor * unet_factor} (VAE factor {factor} x UNet downsampling {unet_factor})")
    return size // factor


def build(model: str, seed: int, unet_only: bool = False):
    """A LatentDiffusion (eval mode) or its UNet from the config with seeded random weights; zero-initialised layers
    get small random values so every branch computes something real."""
    from ldm.util import instantiate_from_config
    from tests._tiny_models import randomize_zero_parameters

    config = OmegaConf.load(MODEL_CONFIGS[model]).model
    torch.manual_seed(seed)
    built = instantiate_from_config(config.params.unet_config if unet_only else config)
    randomize_zero_parameters(built, torch.Generator().manual_seed(seed + 1))
    return built if unet_only else built.eval()


class PersonalizedUNet:
    """Edited K/V projections for a UNet (one random concept) in named variants, switched in and out in place, so
    plain and personalized forwards use the very same weights. "plain" holds the original ``nn.Linear`` objects."""

    def __init__(self, unet: torch.nn.Module, width: int, seed: int):
        attention = [m for m in unet.modules() if getattr(m, "is_cross_attention", False)]
        self.unet, self.seed = unet, seed
        self.variants = {"plain": [(m, name, getattr(m, name)) for m in attention for name in ("to_k", "to_v")]}
        g = torch.Generator().manual_seed(seed)
        self.target_input, self.superclass_input = torch.randn(width, generator=g), torch.randn(width, generator=g)
        basis = torch.randn(width, width, generator=g) / math.sqrt(width)  # a random SPD C^-1
        self.c_inv_target_input = (basis @ basis.T + 0.1 * torch.eye(width)) @ self.target_input

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
            layer.initialize_targets(self.superclass_input)  # o*_K lock; o*_V starts at W_V i_super, then moves
            if layer.role == "value":
                noise = 0.1 * torch.randn(layer.target_output.shape, generator=generator)
                layer.set_target_outputs(layer.target_output + noise.to(layer.target_output))
        self.variants[label] = [(m, name, getattr(m, name)) for m, name, _ in self.variants["plain"]]
        return state, edited_layers(self.unet, "value")

    def use(self, label: str) -> None:
        for module, name, layer in self.variants[label]:
            setattr(module, name, layer)


def train_worker(spec: dict) -> dict:
    """Training steps of spec["variants"] ([checkpointing, mode] pairs) on one UNet switched in place: warm-up steps,
    then spec["steps"] interleaved rounds. Per step: noisy latent (B, 4, H/f, W/f), random timestep, random context
    (B, 77, D), noise target. With a single variant (a memory run, its own fresh process) also the peak memory."""
    import torch._dynamo  # noqa: F401 - ~150 MB of code that AdamW and checkpointing import lazily: not in the peaks
    from ldm.modules.attention import BasicTransformerBlock
    from ldm.modules.diffusionmodules.openaimodel import ResBlock

    device, batch, amp, seed = torch.device(spec["device"]), spec["batch"], spec["device"] != "cpu", spec["seed"]
    variants = [tuple(variant) for variant in spec["variants"]]
    latent, width = check_image_size(spec["model"], spec["size"]), config_params(spec["model"]).context_dim
    rss_start = memory_mb()
    unet = build(spec["model"], seed, unet_only=True).to(device).train()
    personalized, generator = PersonalizedUNet(unet, width, seed + 3), torch.Generator().manual_seed(seed + 2)
    trainable = {"full": list(unet.parameters()), "floor": []}
    if any(mode == "perfusion" for _, mode in variants):
        state, values = personalized.add_variant("perfusion", beta=TRAIN_BETA, tau=TRAIN_TAU)
        trainable["perfusion"] = [layer.target_output for layer in values.values()]
        targets = [t[None].to(device) for t in (personalized.target_input, personalized.c_inv_target_input)]
    # fused AdamW (one kernel over all tensors, CPU and CUDA) is what a fast full fine-tuning run uses
    optimizers = {mode: torch.optim.AdamW(trainable[mode], lr=1e-5, weight_decay=1e-2, fused=True)
                  for _, mode in variants if mode != "floor"}
    scalers = {mode: torch.amp.GradScaler(device.type, enabled=amp) for _, mode in variants}
    gc.collect()
    rss_built = memory_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda_built = torch.cuda.memory_allocated(device)
    was_reset = reset_peak_rss()

    def step(variant) -> dict:
        checkpointing, mode = variant
        for module in unet.modules():  # the flags that ``use_checkpoint`` in the UNet config sets
            if isinstance(module, (ResBlock, BasicTransformerBlock)):
                setattr(module, "use_checkpoint" if isinstance(module, ResBlock) else "checkpoint", checkpointing)
        personalized.use("perfusion" if mode == "perfusion" else "plain")
        for name, parameters in trainable.items():
            for parameter in parameters:
                parameter.requires_grad_(name == mode)
        x = torch.randn(batch, 4, latent, latent, generator=generator).to(device)
        noise = torch.randn(x.shape, generator=generator).to(device)
        t = torch.randint(0, 1000, (batch,), generator=generator).to(device)
        context = torch.randn(batch, 77, width, generator=generator).to(device).requires_grad_(mode != "full")
        optimizer, scaler = optimizers.get(mode), scalers[mode]

        def forward_backward():
            if mode == "perfusion":  # the per-step EMA update of i* re-keys the state
                state.set_targets(*targets)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                loss = F.mse_loss(unet(x + noise, t, context).float(), noise)
            scaler.scale(loss).backward()
            return loss

        def optimizer_step():
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        fwd_bwd_s, fwd_bwd_cpu, loss = timed(forward_backward, device)
        grad_norm = float(context.grad.norm()) if context.grad is not None else None
        if not torch.isfinite(loss) or (mode != "full" and not grad_norm):
            raise FloatingPointError(f"{mode}: loss {loss.item()}, context gradient norm {grad_norm}")
        if any(p.grad is None for p in trainable[mode]):
            raise RuntimeError(f"{mode}: some trainable tensors received no gradient")
        optimizer_s, optimizer_cpu, _ = timed(optimizer_step, device) if optimizer else (0.0, 0.0, None)  # floor: none
        return {"fwd_bwd_s": fwd_bwd_s, "optimizer_s": optimizer_s, "step_s": fwd_bwd_s + optimizer_s,
                "cpu_s": fwd_bwd_cpu + optimizer_cpu, "context_grad_norm": grad_norm}

    for variant in variants:  # the first step allocates AdamW's state; the next is full fine-tuning's peak
        for _ in range(spec["warmup"]):
            step(variant)
    records = interleaved(step, variants, spec["steps"], f"timed rounds of {len(variants)} step(s)")
    peak = memory_mb("VmHWM")
    timings = []
    for (checkpointing, mode), steps in records.items():
        timing = {k: median([r[k] for r in steps]) for k in ("step_s", "fwd_bwd_s", "optimizer_s", "cpu_s")}
        timing.update(checkpointing=checkpointing, mode=mode, all_step_s=[r["step_s"] for r in steps],
                      steps_per_s=1.0 / timing["step_s"], context_grad_norm=steps[-1]["context_grad_norm"])
        if device.type == "cuda":
            accumulation = timing["grad_accumulation"] = max(1, 16 // batch)
            timing["estimate_400_steps_batch16_s"] = 400 * (accumulation * timing["fwd_bwd_s"] + timing["optimizer_s"])
        timings.append(timing)
    if len(variants) > 1:
        return {"timings": timings}
    result = {"trainable_params": sum(p.numel() for p in trainable[variants[0][1]]), "fused_adamw": True,
              "alone_step_s": timings[0]["step_s"], "alone_cpu_s": timings[0]["cpu_s"],
              "context_grad_norm": timings[0]["context_grad_norm"], "rss_model_mb": rss_built - rss_start,
              "peak_total_mb": peak - rss_start, "step_extra_mb": peak - rss_built,
              "peak_source": "VmHWM reset after build" if was_reset else "whole process peak"}
    if device.type == "cuda":
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["cuda_step_extra_mb"] = (torch.cuda.max_memory_allocated(device) - cuda_built) / 2**20
    return result


@torch.no_grad()
def unet_overhead_worker(spec: dict) -> dict:
    """Median forward time of the plain vs the personalized UNet (edited weights folded once / every call)."""
    device, model, batch, seed = torch.device(spec["device"]), spec["model"], spec["batch"], spec["seed"]
    latent, width = check_image_size(model, spec["size"]), config_params(model).context_dim
    unet = build(model, seed, unet_only=True).to(device).eval()
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
            every_call_state.set_gating(INFERENCE_BETA, INFERENCE_TAU)  # a state change: edited weights are rebuilt
        return timed(lambda: unet(x, t, context), device)

    variants = ["plain", "personalized", "personalized_every_call"]
    outputs = {v: run(v)[2] for v in variants}  # warm-up, and the outputs to compare
    records = interleaved(run, variants, spec["repeats"], f"{MODEL_LABELS[model]} UNet forwards x3")
    times, cpu_times = ({v: [r[i] for r in records[v]] for v in variants} for i in (0, 1))
    plain_s, personalized_s, every_call_s = (median(times[v]) for v in variants)
    return {"plain_s": plain_s, "personalized_s": personalized_s, "personalized_every_call_s": every_call_s,
            "overhead": personalized_s / plain_s - 1.0, "overhead_every_call": every_call_s / plain_s - 1.0,
            "overhead_cpu_time": median(cpu_times["personalized"]) / median(cpu_times["plain"]) - 1.0,
            "personalized_over_plain": personalized_s / plain_s, "all_s": times, "all_cpu_s": cpu_times,
            # the edit must change the output (else nothing real was timed); rebuilding every call must not
            "edit_changes_output": float((outputs["personalized"] - outputs["plain"]).abs().max()),
            "every_call_matches": float((outputs["personalized"] - outputs["personalized_every_call"]).abs().max())}


@torch.no_grad()
def sample_worker(spec: dict) -> dict:
    """Seconds for one full text-to-image sample: ours (plain and personalized) vs diffusers, same checkpoint."""
    import diffusers
    from ldm.util import save_state_dict
    from sgm.sampling import sample as sample_model

    device, model, seed, size = torch.device(spec["device"]), spec["model"], spec["seed"], spec["size"]
    steps, scale, prompt, latent = spec["steps"], spec["scale"], spec["prompt"], check_image_size(model, size)
    ours = build(model, seed)
    checkpoint, config = Path(spec["tmpdir"]) / "model.safetensors", str(MODEL_CONFIGS[model])
    try:  # diffusers converts UNet and VAE from our file; the text model and tokenizer are copies of ours
        save_state_dict(ours.state_dict(), checkpoint)
        checkpoint_mb = checkpoint.stat().st_size / 2**20
        unet = diffusers.UNet2DConditionModel.from_single_file(str(checkpoint), original_config=config)
        vae = diffusers.AutoencoderKL.from_single_file(str(checkpoint), original_config=config)
    finally:
        checkpoint.unlink(missing_ok=True)  # SD1.5: ~4 GB, never left behind longer than needed
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
        set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading", prediction_type="epsilon")
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=copy.deepcopy(ours.cond_stage_model.transformer.text_model).eval(),
        tokenizer=ours.cond_stage_model.tokenizer, unet=unet.eval(), scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    ours = ours.to(device)
    personalized = PersonalizedUNet(ours.model.diffusion_model, ours.cond_stage_model.width, seed + 3)
    personalized.add_variant("perfusion")
    x_T = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(seed + 4)).to(device)

    def ours_sample(variant: str, n_steps: int):
        personalized.use(variant)
        c, uc = ours.get_learned_conditioning([prompt]), ours.get_learned_conditioning([""])
        latents = sample_model(ours, c, x_T.clone(), uc, steps=n_steps, scale=scale)
        return ((ours.decode_first_stage(latents) + 1.0) / 2.0).clamp(0.0, 1.0)

    samplers = {"ours": lambda n: ours_sample("plain", n), "ours_perfusion": lambda n: ours_sample("perfusion", n),
                "diffusers": lambda n: pipe(prompt, height=size, width=size, num_inference_steps=n, eta=0.0,
                                            guidance_scale=scale, latents=x_T.clone(), output_type="pt").images}
    for _ in range(spec["warmup"]):  # one-step runs: first-call allocations and kernel setup are not timed
        for sampler in samplers.values():
            sampler(1)
    records = interleaved(lambda name: timed(lambda: samplers[name](steps), device), list(samplers),
                          spec["repeats"], f"{MODEL_LABELS[model]} samples x3")
    times = {name: [r[0] for r in rows] for name, rows in records.items()}
    images = {name: rows[-1][2].cpu() for name, rows in records.items()}
    ours_s, perfusion_s, diffusers_s = (median(times[name]) for name in samplers)
    return {"checkpoint_mb": checkpoint_mb, "ours_s": ours_s, "ours_perfusion_s": perfusion_s,
            "diffusers_s": diffusers_s, "all_s": times, "ours_over_diffusers": ours_s / diffusers_s,
            "perfusion_over_diffusers": perfusion_s / diffusers_s,
            # same checkpoint, noise and schedule: the images must agree (both timed the same computation)
            "max_abs_image_diff_ours_vs_diffusers": float((images["ours"] - images["diffusers"]).abs().max()),
            "max_abs_image_diff_perfusion_vs_ours": float((images["ours_perfusion"] - images["ours"]).abs().max())}


@torch.no_grad()
def training_extras_worker(spec: dict) -> dict:
    """Median times of the primitives that the latent cache saves and that logging spends (see --training-extras)."""
    device, batch, seed, repeats = torch.device(spec["device"]), spec["batch"], spec["seed"], spec["repeats"]
    latent, width = check_image_size(spec["model"], spec["size"]), config_params(spec["model"]).context_dim
    model = build(spec["model"], seed).to(device)
    unet = model.model.diffusion_model
    generator = torch.Generator().manual_seed(seed + 2)
    image = (torch.rand(batch, 3, spec["size"], spec["size"], generator=generator) * 2 - 1).to(device)

    def latents(n):
        return torch.randn(n, 4, latent, latent, generator=generator).to(device)

    def contexts(n, grad=False):
        return torch.randn(n, 77, width, generator=generator).to(device).requires_grad_(grad)

    def train_micro_batch():
        with torch.enable_grad():
            context = contexts(batch, grad=True)
            loss = F.mse_loss(unet(latents(batch), torch.randint(0, 1000, (batch,)).to(device), context),
                              latents(batch))
            loss.backward()
        return loss

    forward_batches = sorted({2 * spec["prompts"], batch, 2 * batch})
    operations = {"encode_s": lambda: model.encode_first_stage(image).sample(), "train_micro_batch_s": train_micro_batch,
                  **{f"decode_{n}_s": (lambda n=n: model.decode_first_stage(latents(n))) for n in (spec["prompts"], batch)},
                  **{f"unet_forward_{n}_s": (lambda n=n: unet(latents(n), torch.full((n,), 500).to(device), contexts(n)))
                     for n in forward_batches}}
    for operation in operations.values():  # warm-up
        operation()
    records = interleaved(lambda name: timed(operations[name], device)[0], list(operations), repeats,
                          f"{MODEL_LABELS[spec['model']]} primitives")
    t = {name: median(values) for name, values in records.items()}
    prompts, betas, steps, every, run_steps, micro = (spec[k] for k in ("prompts", "betas", "validation_steps",
                                                                       "every", "run_steps", "micro_batches"))
    validation_log_s = betas * (steps * t[f"unet_forward_{2 * prompts}_s"] + t[f"decode_{prompts}_s"])
    old_log_s = (50 * t[f"unet_forward_{batch}_s"] + 50 * t[f"unet_forward_{2 * batch}_s"]
                 + 3 * t[f"decode_{batch}_s"] + t["encode_s"])  # two samples, reconstruction, its encoding
    training_s = run_steps * micro * (t["train_micro_batch_s"] + t["encode_s"])
    cached_training_s = run_steps * micro * t["train_micro_batch_s"]

    def share(log_s, logs):
        return logs * log_s / (cached_training_s + logs * log_s)

    return {**t, "all_s": records, "validation_log_s": validation_log_s, "old_image_log_s": old_log_s,
            "run_training_s": training_s, "run_training_cached_s": cached_training_s,
            "latent_cache_saving_per_micro_batch": t["encode_s"] / (t["encode_s"] + t["train_micro_batch_s"]),
            "validation_share": share(validation_log_s, run_steps // every),
            "old_image_logger_share": share(old_log_s, run_steps // 25)}


WORKERS = {"train": train_worker, "unet_overhead": unet_overhead_worker, "sample": sample_worker,
           "training_extras": training_extras_worker}


def run_worker_main(job: str, spec_json: str, result_path: str) -> int:
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    try:
        result, code = WORKERS[job](spec), 0
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which carries on with other variants
        traceback.print_exc(file=sys.stderr)
        result, code = {"error": describe_error(err)}, 1
    Path(result_path).write_text(json.dumps({**result, "load_average_end": load_average()}))
    return code


def run_in_subprocess(job: str, spec: dict, args) -> dict:
    """One measurement in a fresh Python process; errors, crashes, OOM kills and timeouts come back as {"error": ...}.
    The worker's scratch folder (spec["tmpdir"], under --tmpdir) belongs to the parent: it goes even on a kill."""
    log(f"{job}: {json.dumps({k: v for k, v in spec.items() if k != 'prompt'})}")
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="perfusion-benchmark-", dir=args.tmpdir) as folder:
        result_path = Path(folder) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", job, "--spec",
                   json.dumps({**spec, "tmpdir": folder}), "--result", str(result_path)]
        try:  # the worker's prints go to our stderr, keeping our stdout for tables and JSON
            code = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr, timeout=args.timeout,
                                  cwd=str(REPO_ROOT)).returncode
        except subprocess.TimeoutExpired:
            code = None
        if result_path.is_file():
            result = json.loads(result_path.read_text())
        elif code is None:
            result = {"error": f"timed out after {args.timeout:.0f} s (raise --timeout)"}
        else:
            note = " (SIGKILL: on Linux usually the out-of-memory killer)" if code == -9 else ""
            result = {"error": f"worker ended with status {code}{note} without a result"}
    if "error" in result:
        log(f"{job} failed: {result['error']}")
    return {**spec, **result, "load_average_start": load_start}


def fmt(value, digits=3, suffix=""):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}{suffix}" if isinstance(value, float) else f"{value}{suffix}"


def col(header: str, key: str, digits: int = 3, percent: bool = False):
    """A table column: its header and a function formatting ``row[key]`` (as a percentage with ``percent``)."""
    if percent:
        return header, lambda row: fmt(None if row.get(key) is None else 100 * row[key], 1, "%")
    return header, lambda row: fmt(row.get(key), digits)


LOAD_COLUMN = ("load", lambda r: f"{r.get('load_average_start')}->{r.get('load_average_end')}")


def report(section: str, title: str, columns, rows, ratios, labels: int, extra_rows=(), **summary) -> dict:
    """The one table printer: a section's markdown table (error rows keep ``labels`` columns), then its JSON line."""
    print(f"\n### {title}\n\n| " + " | ".join(h for h, _ in columns) + " |\n|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        cells = [cell(row) for _, cell in columns[:labels]]
        cells += (["error: " + row["error"]] + [""] * (len(columns) - labels - 1) if "error" in row
                  else [cell(row) for _, cell in columns[labels:]])
        print("| " + " | ".join(str(c) for c in cells) + " |")
    for cells in extra_rows:
        print("| " + " | ".join(str(c) for c in cells) + " |")
    summary = {"section": section, **summary, "ratios": ratios}
    print("\n" + json.dumps(summary), flush=True)
    return {**summary, "rows": rows}


def models_for(args, include_tiny: bool) -> list[str]:
    return ["tiny"] if args.tiny else ["tiny"] * include_tiny + ["sd15"]


def size_for(args, model: str) -> int:
    return args.tiny_size if model == "tiny" else args.size or (512 if args.device.startswith("cuda") else 256)


def base_spec(args, model: str, **spec) -> dict:
    # tiny models are all per-operation overhead: several threads there mostly measure thread wake-ups
    return {"device": args.device, "threads": args.tiny_threads if model == "tiny" else args.threads,
            "seed": args.seed, "model": model, "size": size_for(args, model), **spec}


def section_train(args) -> dict:
    model, cuda = models_for(args, include_tiny=False)[0], args.device.startswith("cuda")
    base = base_spec(args, model, batch=args.batch or (4 if cuda else 1), warmup=args.warmup_steps)
    variants = [(checkpointing, mode) for checkpointing in (False, True) for mode in TRAIN_MODES]
    rows = [run_in_subprocess("train", {**base, "checkpointing": checkpointing, "mode": mode, "steps": 1,
                                        "variants": [(checkpointing, mode)]}, args) for checkpointing, mode in variants]
    timing = run_in_subprocess("train", {**base, "steps": args.steps, "variants": variants}, args)
    timed_variants = {(v["checkpointing"], v["mode"]): v for v in timing.get("timings", [])}
    for row in rows:  # interleaved times where that run worked, else those of the variant's own memory run
        if (row["checkpointing"], row["mode"]) in timed_variants:
            row.update(timed_variants[(row["checkpointing"], row["mode"])], timing="interleaved")
        elif "alone_step_s" in row:
            row.update(step_s=row["alone_step_s"], cpu_s=row["alone_cpu_s"], timing="alone")
    ratios, extra_rows = {}, []
    for checkpointing in (False, True):
        full, perf, floor = (next(r for r in rows if (r["checkpointing"], r["mode"]) == (checkpointing, mode))
                             for mode in TRAIN_MODES)
        on_off = "on" if checkpointing else "off"
        values = ratios[f"checkpointing_{on_off}"] = {name: ratio(perf.get(key), full.get(key)) for name, key in (
            ("time", "step_s"), ("cpu_time", "cpu_s"), ("time_alone", "alone_step_s"), ("peak_memory", "peak_total_mb"),
            ("step_memory", "step_extra_mb"), *([("cuda_max_allocated", "cuda_max_allocated_mb")] if cuda else []))}
        values.update(perfusion_over_floor=ratio(perf.get("step_s"), floor.get("step_s")),
                      perfusion_over_floor_cpu_time=ratio(perf.get("cpu_s"), floor.get("cpu_s")))
        extra_rows += [[on_off, "**perfusion / full**", ""] + [fmt(values[k]) for k in ("time", "cpu_time")] + ["", ""]
                       + [fmt(values[k]) for k in ("time_alone", "peak_memory", "step_memory")]
                       + (["", fmt(values["cuda_max_allocated"]), ""] if cuda else []) + [""],
                       [on_off, "**perfusion / floor**", "", fmt(values["perfusion_over_floor"]),
                        fmt(values["perfusion_over_floor_cpu_time"])] + [""] * (6 + 3 * cuda)]
    columns = [("checkpointing", lambda r: "on" if r["checkpointing"] else "off"), col("variant", "mode"),
               ("trainable params", lambda r: f"{r['trainable_params']:,}"), col("s/step", "step_s", 2),
               col("CPU s/step", "cpu_s", 2), col("fwd+bwd s", "fwd_bwd_s", 2), col("optimizer s", "optimizer_s", 2),
               col("s/step alone", "alone_step_s", 2), col("peak total MiB", "peak_total_mb", 0),
               col("step extra MiB", "step_extra_mb", 0)]
    if cuda:
        columns += [col("steps/s", "steps_per_s", 2), col("cuda max alloc MiB", "cuda_max_allocated_mb", 0),
                    col("est. 400x16 s", "estimate_400_steps_batch16_s", 0)]
    note = "times interleaved in one process" if "error" not in timing else "times from the separate memory runs"
    title = (f"Training step: Perfusion vs full fine-tuning and vs the frozen-UNet floor, {MODEL_LABELS[model]} UNet, "
             f"{base['size']}px, batch {base['batch']}, {args.device}, {base['threads']} threads, {note} "
             f"(goal: perfusion / full <= {TRAIN_TIME_GOAL})")
    result = report("train", title, columns + [("load (memory run)", LOAD_COLUMN[1])], rows, ratios, 2, extra_rows,
                    model=model, size=base["size"], batch=base["batch"], device=args.device, goal=TRAIN_TIME_GOAL)
    return {**result, "timing_run": timing}


def per_model_section(args, section: str, title: str, goal: float, columns, ratio_keys, spec) -> dict:
    """A section of one worker run per model (``spec(model)``: its settings) and one ratio set per model."""
    rows = [run_in_subprocess(section, base_spec(args, model, **spec(model)), args)
            for model in models_for(args, include_tiny=True)]
    ratios = {row["model"]: {key: row.get(key) for key in ratio_keys} for row in rows}
    columns = [("model", lambda r: MODEL_LABELS[r["model"]]), col("threads", "threads"), col("px", "size"),
               *columns, LOAD_COLUMN]
    return report(section, title, columns, rows, ratios, 4, device=args.device, goal=goal)


def section_unet_overhead(args) -> dict:
    columns = [col("batch", "batch"), col("N", "repeats"), col("plain s", "plain_s", 4),
               col("personalized s", "personalized_s", 4), col("overhead", "overhead", percent=True),
               col("overhead (CPU s)", "overhead_cpu_time", percent=True),
               col("rebuilt every call s", "personalized_every_call_s", 4),
               col("overhead every call", "overhead_every_call", percent=True)]
    return per_model_section(
        args, "unet_overhead", f"UNet forward: personalized vs plain, {args.device}, median "
        f"(goal: overhead <= {UNET_OVERHEAD_GOAL:.1%})", UNET_OVERHEAD_GOAL, columns,
        ("overhead", "overhead_every_call", "overhead_cpu_time", "personalized_over_plain"),
        lambda model: {"batch": args.batch or 1, "repeats": args.tiny_repeats if model == "tiny" else args.repeats})


def section_sample(args) -> dict:
    columns = [col("steps", "steps"), col("N", "repeats"), col("ours s", "ours_s"),
               col("ours+Perfusion s", "ours_perfusion_s"), col("diffusers s", "diffusers_s"),
               col("ours/diffusers", "ours_over_diffusers"), col("Perfusion/diffusers", "perfusion_over_diffusers"),
               ("max image diff", lambda r: f"{r['max_abs_image_diff_ours_vs_diffusers']:.1e}")]
    return per_model_section(
        args, "sample", f"Full DDIM sample (text encoder + UNet x steps with CFG {args.scale} + VAE decode), "
        f"{args.device} (goal: ours/diffusers <= {SAMPLE_RATIO_GOAL:.2f})", SAMPLE_RATIO_GOAL, columns,
        ("ours_over_diffusers", "perfusion_over_diffusers"),
        lambda model: {"steps": args.sample_steps, "scale": args.scale, "prompt": args.prompt,
                       "repeats": args.tiny_repeats if model == "tiny" else args.sample_repeats,
                       "warmup": 1 if model == "tiny" else args.sample_warmup})


def section_training_extras(args) -> dict:
    from perfusion.validation import DEFAULT_BETAS, DEFAULT_PROMPTS

    columns = [col("batch", "batch"), col("VAE encode s", "encode_s"), col("train micro-batch s", "train_micro_batch_s"),
               col("latent cache saves", "latent_cache_saving_per_micro_batch", percent=True),
               col("validation log s", "validation_log_s", 1), col("validation share", "validation_share", percent=True),
               col("old image log s", "old_image_log_s", 1),
               col("old image logger share", "old_image_logger_share", percent=True)]
    return per_model_section(
        args, "training_extras", f"A default run's extras: latent cache saving and logging share of "
        f"400 steps x 4 micro-batches, {args.device}, medians (goal: validation share <= "
        f"{VALIDATION_SHARE_GOAL:.0%})", VALIDATION_SHARE_GOAL, columns,
        ("latent_cache_saving_per_micro_batch", "validation_share", "old_image_logger_share"),
        lambda model: {"batch": args.batch or 4, "repeats": args.tiny_repeats if model == "tiny" else args.repeats,
                       "prompts": len(DEFAULT_PROMPTS), "betas": len(DEFAULT_BETAS), "validation_steps": 20,
                       "every": 100, "run_steps": 400, "micro_batches": 4})


SECTIONS = {"train": section_train, "unet_overhead": section_unet_overhead, "sample": section_sample,
            "training_extras": section_training_extras}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = p.add_argument
    flag("--train", action="store_true", help="Perfusion vs full fine-tuning vs floor step (time, peak memory)")
    flag("--unet-overhead", action="store_true", help="personalized vs plain UNet forward")
    flag("--sample", action="store_true", help="full DDIM sample: ours vs diffusers' pipeline")
    flag("--training-extras", action="store_true", help="latent-cache saving and logging share of a default run")
    flag("--tiny", action="store_true", help="tiny models only (seconds; for tests)")
    flag("--size", type=int, default=None, help="image side for SD1.5 (default 256 on CPU, 512 on CUDA)")
    flag("--tiny-size", type=int, default=32, help="image side for the tiny model")
    flag("--batch", type=int, default=None, help="training/UNet batch (default 1 on CPU, 4 on CUDA training)")
    flag("--steps", type=int, default=2, help="timed training rounds, one step of every variant each (median)")
    flag("--warmup-steps", type=int, default=1, help="untimed training steps per variant first")
    flag("--repeats", type=int, default=3, help="SD1.5 UNet forwards per variant (median)")
    flag("--tiny-repeats", type=int, default=20, help="repeats for tiny-model forwards and samples (median)")
    flag("--sample-steps", type=int, default=5, help="DDIM steps per sample")
    flag("--sample-repeats", type=int, default=1, help="SD1.5 samples per variant")
    flag("--sample-warmup", type=int, default=1, help="untimed one-step SD1.5 samples per variant first")
    flag("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    flag("--prompt", type=str, default="a photo of a teddy bear on the beach")
    flag("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads for SD1.5 sizes")
    flag("--tiny-threads", type=int, default=1, help="torch CPU threads for tiny models")
    flag("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    flag("--seed", type=int, default=0)
    flag("--timeout", type=float, default=3600.0, help="seconds allowed for each measurement subprocess")
    flag("--tmpdir", type=str, default=None, help="folder for the workers' scratch files (SD1.5 --sample: ~4 GB)")
    flag("--json", type=str, default=None, help="write all results to this JSON file")
    flag("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    flag("--spec", help=argparse.SUPPRESS)
    flag("--result", help=argparse.SUPPRESS)
    return p


def check_arguments(parser: argparse.ArgumentParser, args) -> None:
    for name, least in {"steps": 1, "repeats": 1, "tiny_repeats": 1, "sample_steps": 1, "sample_repeats": 1,
                        "threads": 1, "tiny_threads": 1, "warmup_steps": 0, "sample_warmup": 0, "batch": 1}.items():
        if getattr(args, name) is not None and getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
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
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               None) if os.path.exists("/proc/cpuinfo") else None
    results = {"environment": {"torch": torch.__version__, "python": sys.version.split()[0], "cpu": cpu,
                               "cpu_count": os.cpu_count(), "threads": args.threads, "tiny_threads": args.tiny_threads,
                               "device": args.device, "load_average_start": load_average()}, "sections": {}}
    if args.device.startswith("cuda"):
        results["environment"]["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    start = time.perf_counter()
    for name in [name for name in SECTIONS if getattr(args, name)] or list(SECTIONS):
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
