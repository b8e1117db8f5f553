"""Generate images with Perfusion concepts (or the plain base model).

    python scripts/perfusion_txt2img.py --ddim_eta 0.0 --steps 50 --scale 6.0 --beta 0.7 --tau 0.15 \
        --n_samples 4 --n_iter 1 --personalized_ckpt ./ckpt/teddy.safetensors --prompt "photo of a {}"

``{}`` marks the concept in the prompt; with several concept files (``--personalized_ckpt a,b``) use ``{1}``,
``{2}``, ... Each PNG records prompt, negative prompt, seed, sampler, steps, scale, beta, tau (and where they came
from: flag, concept file or default) and concept files in its metadata.

Without --beta/--tau a concept whose file holds a *selected* beta/tau (scripts/evaluate.py --select-beta, for the
same locking mode) uses those; any other concept uses the generic defaults.

SD XL (``--config configs/perfusion_inference_sdxl.yaml --ckpt ckpt/sd_xl_base_1.0.safetensors``): the same flags;
``--original_size`` / ``--target_size`` set the size conditioning (default: the image size, crop (0, 0)); the
unconditional side of guidance is the empty prompt's encoding (or the negative prompt's).
"""
from __future__ import annotations

import argparse
import re
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from PIL.PngImagePlugin import PngInfo  # noqa: E402

from ldm.util import UserError, load_model_from_config, run_command  # noqa: E402
from perfusion.roe import INFERENCE_BETA, INFERENCE_TAU, MULTI_CONCEPT_BETA  # noqa: E402

# Single-token strings to rename placeholders to when two concept files share one.
SPARE_PLACEHOLDERS = ["*", "&", "@", "$", "%", "#", "+", "=", "~", "^"]
PLACEHOLDER_PATTERN = re.compile(r"\{(\d*)\}")


class UsageError(UserError, ValueError):
    """Bad command-line input, reported before any model loads."""


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", type=str, default="a photo of a {}", help="{} (or {1}, {2}, ...) marks concepts")
    p.add_argument("--negative_prompt", type=str, default="",
                   help="what the image should not show: guidance pushes away from it instead of from the empty "
                        "prompt (needs --scale != 1); may hold {} for a concept like --prompt")
    p.add_argument("--from-file", dest="from_file", type=str, default=None, help="prompts, one per line")
    p.add_argument("--personalized_ckpt", type=str, default=None, help="concept file(s), comma separated")
    p.add_argument("--beta", type=str, default=None,
                   help="gate bias, one value or one per concept (default: the value selected for the concept by "
                        f"scripts/evaluate.py --select-beta if its file holds one, else {INFERENCE_BETA}; "
                        f"{MULTI_CONCEPT_BETA} for several)")
    p.add_argument("--tau", type=str, default=None,
                   help="gate temperature, one or per concept (default: the concept file's selected value if any, "
                        f"else {INFERENCE_TAU})")
    p.add_argument("--global_locking", action="store_true", help="keys see the super-class prompt")
    p.add_argument("--advanced_sampler", action="store_true", help="use the sgm sampler of --sampler_config")
    p.add_argument("--sampler_config", type=str, default="configs/sampler/sampler.yaml")
    p.add_argument("--denoiser_config", type=str, default="configs/denoiser/denoiser.yaml")
    p.add_argument("--config", type=str, default="configs/perfusion_inference.yaml")
    p.add_argument("--ckpt", type=str, default="ckpt/v1-5-pruned-emaonly.ckpt",
                   help="base model: a single-file checkpoint (.ckpt/.safetensors) or a diffusers model folder "
                        "(unet/, vae/, text_encoder/, as written by save_pretrained) of the --config's family")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scale", type=float, default=6.0, help="classifier-free guidance scale")
    p.add_argument("--ddim_eta", type=float, default=0.0)
    p.add_argument("--plms", action="store_true")
    p.add_argument("--n_samples", type=int, default=4, help="images per prompt and iteration (batch size)")
    p.add_argument("--n_iter", type=int, default=1)
    p.add_argument("--n_rows", type=int, default=0, help="grid columns (default n_samples)")
    p.add_argument("--H", type=int, default=None, help="image height (default: the config's image size)")
    p.add_argument("--W", type=int, default=None, help="image width (default: the config's image size)")
    p.add_argument("--C", type=int, default=None, help="latent channels (default: the config's)")
    p.add_argument("--f", type=int, default=None, help="downsampling factor of the autoencoder (default: the config's)")
    p.add_argument("--original_size", type=str, default=None,
                   help="SD XL only: the size conditioning original_size as H,W (default: --H,--W)")
    p.add_argument("--target_size", type=str, default=None,
                   help="SD XL only: the size conditioning target_size as H,W (default: --H,--W)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--fixed_code", action="store_true", help="same start noise for every iteration")
    p.add_argument("--outdir", type=str, default="outputs/txt2img-samples")
    p.add_argument("--skip_grid", action="store_true")
    p.add_argument("--skip_save", action="store_true")
    p.add_argument("--precision", choices=["autocast", "full"], default="autocast",
                   help="autocast: fp16 on CUDA (the CPU always runs fp32)")
    p.add_argument("--device", type=str, default=None, help="cuda or cpu (default: cuda when available)")
    return p


# ----- validation before any model loads ----------------------------------------------------------------------
def parse_float_list(text: str | None, name: str, count: int, default: float) -> list[float]:
    if text is None:
        return [default] * max(count, 1)
    try:
        values = [float(v) for v in str(text).split(",") if v.strip() != ""]
    except ValueError:
        raise UsageError(f"--{name} '{text}': give a number or comma-separated numbers, e.g. --{name} 0.7,0.6")
    if len(values) == 1:
        return values * max(count, 1)
    if len(values) != count:
        raise UsageError(f"--{name} has {len(values)} values but {count} concept file(s) were given; "
                         f"give one value or one per concept")
    return values


def resolve_gating(beta: str | None, tau: str | None, concepts: list, global_locking: bool = False,
                   names: list[str] | None = None):
    """(betas, taus, beta_sources, tau_sources), one entry per concept (one entry without concepts): the --beta /
    --tau flags (comma-separated numbers) parsed, then perfusion.concept_file.choose_gating (a flag wins, then a
    beta/tau selected in the concept file for this locking mode, then ``inference_gating(number of concepts)``)."""
    from perfusion.concept_file import choose_gating

    k = len(concepts)
    beta = None if beta is None else parse_float_list(beta, "beta", k, 0.0)
    tau = None if tau is None else parse_float_list(tau, "tau", k, 0.0)
    return choose_gating(concepts, beta, tau, global_locking, names)


def concept_references(prompt: str) -> list[int]:
    """1-based concept numbers a prompt refers to; ``{}`` is concept 1."""
    return [int(n) if n else 1 for n in PLACEHOLDER_PATTERN.findall(prompt)]


def check_prompts(prompts: list[str], n_concepts: int) -> None:
    for prompt in prompts:
        refs = concept_references(prompt)
        if n_concepts == 0 and refs:
            raise UsageError(f"prompt '{prompt}' has a concept placeholder but no --personalized_ckpt was given")
        if refs and max(refs) > n_concepts:
            raise UsageError(f"prompt '{prompt}' refers to concept {{{max(refs)}}} but only {n_concepts} concept "
                             f"file(s) were given with --personalized_ckpt")
        if "{}" in prompt and n_concepts > 1:
            raise UsageError(f"prompt '{prompt}' uses {{}} but {n_concepts} concepts were given; "
                             "use {1}, {2}, ... to say which concept goes where")
        if n_concepts and not refs:
            raise UsageError(f"prompt '{prompt}' has no {{}} placeholder, so the concept would not appear; "
                             "write {} where the concept goes (e.g. --prompt \"a photo of a {} on the beach\")")


def check_negative_prompt(negative_prompt: str, scale: float, n_concepts: int) -> None:
    if not negative_prompt:
        return
    if scale == 1.0:
        raise UsageError("--negative_prompt works through classifier-free guidance, which --scale 1 turns off; "
                         "give a --scale above 1 (e.g. 6)")
    refs = concept_references(negative_prompt)
    if refs and max(refs) > n_concepts:
        raise UsageError(f"--negative_prompt '{negative_prompt}' refers to concept {{{max(refs)}}} but "
                         f"{n_concepts} concept file(s) were given with --personalized_ckpt")


def check_prompt_length(encoder, prompt: str, placeholders: list[str]) -> None:
    """The text encoder reads max_length - 2 tokens. A prompt that loses a concept's placeholder to that limit is
    an error; one that loses other words is generated with a warning that names them."""
    tokens = encoder.text_tokens(prompt)
    room = encoder.max_length - 2
    if len(tokens) <= room:
        return
    cut = tokens[room:]
    lost = [p for p in placeholders if any(t.replace("</w>", "") == p for t in cut)]
    text = "".join(cut).replace("</w>", " ").strip()
    if lost:
        raise UsageError(f"prompt '{prompt}' is {len(tokens)} tokens long and the text encoder reads {room}: the "
                         f"concept word {lost[0]!r} would be cut away; shorten the prompt or move the concept earlier")
    warnings.warn(f"prompt is {len(tokens)} tokens long; the text encoder reads the first {room}, so "
                      f"'{text}' is ignored")


def config_family(config) -> str:
    from ldm.models.diffusion.ddpm import family_of_text_encoder

    return family_of_text_encoder(str(config.model.params.cond_stage_config.target).rsplit(".", 1)[-1])


def load_and_check_concepts(paths: list[str], config) -> list:
    from ldm.models.diffusion.ddpm import BASE_FAMILIES
    from perfusion.concept_file import check_concepts_compatible, check_target_inputs_independent, load_concept

    for path in paths:
        if not Path(path).is_file():
            raise UsageError(f"concept file not found: {path} (train one with main.py; it writes "
                             "<basedir>/<name>.safetensors)")
    concepts = [load_concept(p) for p in paths]
    family = config_family(config)
    for path, concept in zip(paths, concepts):
        if concept.metadata.get("base_model") != family:
            other = next((f.inference_config for f in BASE_FAMILIES if f.name == concept.metadata.get("base_model")),
                         "the config of the concept's base model")
            raise UsageError(f"concept {path} was trained on base model '{concept.metadata.get('base_model')}' "
                             f"but --config builds '{family}'; use --config {other} with the matching --ckpt")
    try:
        check_concepts_compatible(concepts, paths)
        check_target_inputs_independent(concepts, paths)
    except ValueError as err:
        raise UsageError(str(err)) from err
    return concepts


def distinct_placeholders(concepts) -> list[str]:
    """Each concept's placeholder, renamed where two concepts share one."""
    chosen: list[str] = []
    for concept in concepts:
        own = concept.metadata["placeholder"]
        if own in chosen:
            own = next(p for p in SPARE_PLACEHOLDERS if p not in chosen)
        chosen.append(own)
    return chosen


def fill_prompt(prompt: str, words: list[str]) -> str:
    """Replace {} / {n} by the n-th word (placeholder or super-class word)."""
    return PLACEHOLDER_PATTERN.sub(lambda m: words[(int(m.group(1)) if m.group(1) else 1) - 1], prompt)


# ----- model ------------------------------------------------------------------------------------------------------
def make_sampler(opt, model, verbose: bool = True):
    """(sampler, denoiser, name): DDIM (--ddim_eta) or PLMS (--plms) on the original timesteps, or the sgm sampler
    of --sampler_config with --denoiser_config (--advanced_sampler), all over the model's own noise schedule."""
    from sgm.sampling import build_sampler_and_denoiser, denoiser_for, original_sampler, schedule_of

    if opt.advanced_sampler:
        sampler, denoiser = build_sampler_and_denoiser(opt.sampler_config, opt.denoiser_config,
                                                       parameterization=model.parameterization,
                                                       num_steps=opt.steps, guidance_scale=opt.scale,
                                                       device=str(model.device), verbose=verbose,
                                                       alphas_cumprod=schedule_of(model))
        denoiser = denoiser.to(model.device)
    else:
        sampler = original_sampler(model, "plms" if opt.plms else "ddim", steps=opt.steps, scale=opt.scale,
                                   eta=opt.ddim_eta, verbose=verbose)
        denoiser = denoiser_for(model)
    return sampler, denoiser, type(sampler).__name__


def check_global_locking_words(model, paths: list[str], superclasses: list[str]) -> None:
    """Global locking swaps each concept word for its super-class word token by token: one token each."""
    from perfusion.embedding_manager import word_token_ids

    for path, word in zip(paths, superclasses):
        if len(word_token_ids(model.cond_stage_model, word)) > 1:
            raise UsageError(f"--global_locking: the super-class word '{word}' of {path} is several tokens, so "
                             "the super-class prompt's tokens do not line up with the concept prompt's; use "
                             "local locking (leave out --global_locking)")


def to_images(model, samples) -> list[Image.Image]:
    decoded = model.decode_first_stage(samples.float()).float().clamp(-1, 1)
    arrays = ((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def encode_prompts(model, prompts: list[str], placeholders: list[str], superclasses: list[str] | None = None,
                   negative_prompt: str = "", global_locking: bool = False, sizes: dict | None = None):
    """(texts, c, uc) for a batch, one row per prompt: ``{}``/``{n}`` filled with the concepts' placeholders (none:
    the prompts as they are), the conditioning and guidance's unconditional rows (the negative prompt, or empty).
    With ``global_locking`` the key layers are given each text's super-class prompt; the caller returns to local
    locking with ``model.set_global_locking(None)`` after sampling. ``sizes``: SD XL's size conditioning
    (``size_conditioning``), for both c and uc; None: the model's defaults (SD 1.x/2.x have none)."""
    texts = [fill_prompt(p, placeholders) if placeholders else p for p in prompts]
    negative = fill_prompt(negative_prompt, placeholders) if placeholders else negative_prompt
    if sizes:
        c = model.get_learned_conditioning({"txt": texts, **sizes})
        uc = model.get_learned_conditioning({"txt": [negative] * len(texts), **sizes})
    else:
        c = model.get_learned_conditioning(texts)
        uc = model.get_learned_conditioning([negative] * len(texts))
    if global_locking:
        model.set_global_locking(texts, [fill_prompt(p, superclasses) for p in prompts])
    return texts, c, uc


def sample_images(model, c, uc, x_T, sampler, denoiser, generator=None) -> list[Image.Image]:
    """Sample from the start noise ``x_T`` with ``sampler``/``denoiser`` (make_sampler) and decode to PIL images."""
    from sgm.sampling import sample

    return to_images(model, sample(model, c, x_T, uc, sampler=sampler, denoiser=denoiser, generator=generator))


def png_info(fields: dict) -> PngInfo:
    info = PngInfo()
    for key, value in fields.items():
        info.add_text(key, str(value))
    return info


def make_grid(images: list[Image.Image], columns: int) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


def main(argv=None) -> int:
    return run_command(generate, get_parser().parse_args(argv))


def parse_size(text: str | None, name: str, default: tuple[int, int]) -> tuple[int, int]:
    if text is None:
        return default
    try:
        height, width = (int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise UsageError(f"--{name} '{text}': give height,width, e.g. --{name} 1024,1024") from None
    if height < 1 or width < 1:
        raise UsageError(f"--{name} '{text}': sizes must be positive")
    return height, width


def size_conditioning(opt, config) -> dict | None:
    """SD XL's size conditioning: original size and target size (default: the image size, --H/--W), crop (0, 0).
    None for SD 1.x/2.x, which refuse --original_size / --target_size."""
    if config_family(config) != "sdxl":
        for name in ("original_size", "target_size"):
            if getattr(opt, name, None) is not None:
                raise UsageError(f"--{name} is SD XL's size conditioning; {opt.config} is not an SD XL config")
        return None
    image = (opt.H, opt.W)
    return {"original_size_as_tuple": parse_size(getattr(opt, "original_size", None), "original_size", image),
            "crop_coords_top_left": (0, 0),
            "target_size_as_tuple": parse_size(getattr(opt, "target_size", None), "target_size", image)}


def fill_image_geometry(opt, config) -> None:
    """--f, --C, --H, --W default to the config's: the autoencoder's downsampling (1 for a pixel-space model),
    its latent channels, and image_size x f."""
    params = config.model.params
    ddconfig = (params.first_stage_config.get("params") or {}).get("ddconfig")
    factor = 2 ** (len(ddconfig.ch_mult) - 1) if ddconfig is not None else 1
    if opt.f is None:
        opt.f = factor
    elif opt.f != factor:
        raise UsageError(f"--f {opt.f}: the first stage of {opt.config} downsamples by {factor}; pass --f {factor} "
                         "or leave --f out")
    opt.C = opt.C or int(params.get("channels", 4))
    opt.H = opt.H or int(params.get("image_size", 64)) * factor
    opt.W = opt.W or int(params.get("image_size", 64)) * factor


def generate(opt) -> int:
    from omegaconf import OmegaConf

    # Everything that can be checked without the model is checked first.
    if Path(opt.ckpt).is_dir():
        from ldm.diffusers_format import diffusers_folder_problem

        problem = diffusers_folder_problem(opt.ckpt)
        if problem:
            raise UsageError(f"--ckpt {opt.ckpt}: {problem}")
    for flag, path in (("--config", opt.config), ("--ckpt", opt.ckpt)):
        if not (Path(path).is_file() or (flag == "--ckpt" and Path(path).is_dir())):
            hint = (" Download SD weights into ./ckpt/ (see README, 'Where to put weights')." if flag == "--ckpt"
                    else "")
            raise UsageError(f"{flag} {path}: file not found.{hint}")
    if opt.from_file:
        if not Path(opt.from_file).is_file():
            raise UsageError(f"--from-file {opt.from_file}: file not found")
        prompts = [line.strip() for line in Path(opt.from_file).read_text().splitlines() if line.strip()]
        if not prompts:
            raise UsageError(f"--from-file {opt.from_file} holds no prompts")
    else:
        prompts = [opt.prompt]
    for flag in ("n_samples", "n_iter", "steps"):
        if getattr(opt, flag) < 1:
            raise UsageError(f"--{flag} {getattr(opt, flag)}: must be at least 1")
    if opt.scale < 0:
        raise UsageError(f"--scale {opt.scale}: the guidance scale must be >= 0 (1 = no guidance)")
    try:
        config = OmegaConf.load(opt.config)
    except Exception as err:
        raise UsageError(f"--config {opt.config}: not a readable YAML config ({str(err).splitlines()[0]})") from err
    fill_image_geometry(opt, config)
    if opt.H % opt.f or opt.W % opt.f:
        raise UsageError(f"--H {opt.H} and --W {opt.W} must be multiples of --f {opt.f}")
    sizes = size_conditioning(opt, config)
    paths = [p.strip() for p in opt.personalized_ckpt.split(",") if p.strip()] if opt.personalized_ckpt else []
    check_prompts(prompts, len(paths))
    check_negative_prompt(opt.negative_prompt, opt.scale, len(paths))
    concepts = load_and_check_concepts(paths, config) if paths else []
    betas, taus, beta_sources, tau_sources = resolve_gating(opt.beta, opt.tau, concepts, opt.global_locking, paths)
    if any(t <= 0 for t in taus):
        raise UsageError(f"--tau must be > 0, got {opt.tau}")
    if opt.plms and opt.ddim_eta != 0:
        raise UsageError("--plms is deterministic: leave --ddim_eta at 0")
    if opt.global_locking and not concepts:
        raise UsageError("--global_locking needs --personalized_ckpt")

    device = torch.device(opt.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model_from_config(config, opt.ckpt, device)
    placeholders = distinct_placeholders(concepts) if concepts else []
    if concepts:
        model.load_concepts(concepts, beta=betas, tau=taus, placeholders=placeholders)
    superclasses = [c.metadata.get("superclass") or c.metadata["placeholder"] for c in concepts]
    if opt.global_locking:
        check_global_locking_words(model, paths, superclasses)
    for prompt in [*prompts, opt.negative_prompt]:
        check_prompt_length(model.cond_stage_model, fill_prompt(prompt, placeholders) if concepts else prompt,
                            placeholders)
    sampler, denoiser, sampler_name = make_sampler(opt, model)

    outdir = Path(opt.outdir)
    sample_dir = outdir / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    base_count = len(list(sample_dir.glob("*.png")))
    grid_count = len(list(outdir.glob("grid-*.png")))
    autocast = (torch.autocast("cuda", dtype=torch.float16) if opt.precision == "autocast" and device.type == "cuda"
                else nullcontext())
    shape = (opt.C, opt.H // opt.f, opt.W // opt.f)
    generator = torch.Generator(device=device).manual_seed(opt.seed)
    fixed_code = torch.randn((opt.n_samples, *shape), generator=generator, device=device) if opt.fixed_code else None
    all_images = []
    with torch.no_grad(), autocast:
        for prompt in prompts:
            texts, c, uc = encode_prompts(model, [prompt] * opt.n_samples, placeholders, superclasses,
                                          opt.negative_prompt, opt.global_locking, sizes)
            text = texts[0]
            for iteration in range(opt.n_iter):
                x_T = fixed_code if fixed_code is not None else torch.randn((opt.n_samples, *shape),
                                                                            generator=generator, device=device)
                images = sample_images(model, c, uc, x_T, sampler, denoiser, generator)
                fields = {"prompt": prompt, "text": text, "negative_prompt": opt.negative_prompt, "seed": opt.seed,
                          "iteration": iteration,
                          "sampler": sampler_name, "steps": opt.steps, "scale": opt.scale, "eta": opt.ddim_eta,
                          "beta": ",".join(f"{b:g}" for b in betas) if concepts else "",
                          "tau": ",".join(f"{t:g}" for t in taus) if concepts else "",
                          "beta_source": ",".join(beta_sources) if concepts else "",
                          "tau_source": ",".join(tau_sources) if concepts else "",
                          "global_locking": opt.global_locking, "concepts": ",".join(paths),
                          "base_checkpoint": opt.ckpt, "size": f"{opt.W}x{opt.H}"}
                if sizes:
                    fields.update({"original_size": "{},{}".format(*sizes["original_size_as_tuple"]),
                                   "target_size": "{},{}".format(*sizes["target_size_as_tuple"])})
                if not opt.skip_save:
                    for image in images:
                        image.save(sample_dir / f"{base_count:05d}.png", pnginfo=png_info(fields))
                        base_count += 1
                all_images.extend((image, fields) for image in images)
            if opt.global_locking:
                model.set_global_locking(None)
    if not opt.skip_grid and all_images:
        grid = make_grid([im for im, _ in all_images], opt.n_rows or opt.n_samples)
        grid_fields = dict(all_images[0][1], prompts=" | ".join(prompts))
        grid.save(outdir / f"grid-{grid_count:04d}.png", pnginfo=png_info(grid_fields))
    print(f"Your samples are ready in {outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
