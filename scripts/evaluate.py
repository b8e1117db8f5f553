"""Evaluate Perfusion concepts: generate prompts over a sweep of gate settings and score each setting.

    python scripts/evaluate.py --personalized_ckpt ckpt/teddy.safetensors --train_images data/teddy \\
        --prompts data/prompts/objects.txt --beta 0.5,0.6,0.7,0.8 --tau 0.15 --global_locking both --n 8 \\
        --outdir outputs/eval/teddy [--select-beta]

Settings are the grid --beta x --tau x --global_locking (off, on or both). For each setting and prompt, --n images
are generated through scripts/perfusion_txt2img.py's code path (the model's load_concepts, the same prompt encoding,
sampler and decoding; DDIM by default). Prompt i uses seed --seed + i, so image j of prompt i starts from the same
noise in every setting, and equals image j of ``perfusion_txt2img.py --seed <seed + i> --n_samples <n>`` with the
same beta/tau. Images go to <outdir>/<setting>/p<prompt>_seed<seed>_<j>.png; a rerun reuses every image whose
recorded settings match (resumable) and generates only what is missing.

Metrics per setting (mean over all images; *_std: spread, the standard deviation over prompts of the per-prompt mean):
  --metric clip (default)
    clip_i  fidelity: mean cosine similarity of open_clip image embeddings between every generated image and every
            training image (--train_images), all pairs;
    clip_t  alignment: mean cosine similarity between each image and its prompt with the concept replaced by the
            concept's super-class word (the file's "superclass");
    dino    fidelity as clip_i with a DINO ViT's CLS token (transformers, --dino_model), when its weights are in
            the local cache or folder; otherwise skipped with a one-line note.
    Similarities are raw cosines, as in the DreamBooth / Custom Diffusion / Perfusion papers: NOT CLIPScore, which
    rescales them to 2.5 * max(cos, 0) (Hessel et al. 2021). The CLIP model is --clip_model/--clip_pretrained (default ViT-B-32,
    openai); weights come from a local file or the Hugging Face cache (HF_HUB_OFFLINE is respected).
  --metric toy
    the toy oracle (data/toy_oracle.py) instead of networks: fidelity = share of images in which each concept's
    pattern is found (concept_found; mean over concepts); alignment = share of images that follow what the prompt
    asks for besides the concept (requested background; for two-object prompts both objects, bound correctly:
    toy_oracle.check on the prompt with the super-class word); prompts that ask for nothing else are not judged.

Output: results.csv (one row per setting), pareto.png (alignment against fidelity, one labelled point per setting,
the Pareto front and the balanced setting marked), sheet.png (first image of every prompt x setting).

Balanced setting (always reported; --select-beta also stores it): each of fidelity and alignment is min-max
normalised over the settings (the worst setting 0, the best 1; an axis on which all settings tie counts 1 for all)
and the setting with the highest harmonic mean 2 f a / (f + a) of the two wins (ties: the first setting in sweep
order). --select-beta writes its beta and tau into the concept file's metadata as the concept's default, with a
"selected_by" record (rule, locking mode, every setting's scores); perfusion_txt2img.py then uses them when
--beta/--tau are not given (for the same locking mode). Needs exactly one concept file; when every setting scores
the same, nothing is written.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import sys
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from ldm.util import atomic_write, load_model_from_config, run_command  # noqa: E402
from scripts.perfusion_txt2img import (UsageError, check_global_locking_words, check_prompt_length,  # noqa: E402
                                       check_prompts, distinct_placeholders, encode_prompts, fill_image_geometry,
                                       fill_prompt, load_and_check_concepts, make_sampler, png_info, sample_images)

REPO = Path(__file__).resolve().parents[1]
PROMPT_SETS = {"clip": REPO / "data" / "prompts" / "objects.txt", "toy": REPO / "data" / "prompts" / "toy.txt"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SELECTION_RULE = ("highest harmonic mean of fidelity and alignment, each min-max normalised over the settings "
                  "(ties: first setting in sweep order)")


# ----- metrics on embeddings ----------------------------------------------------------------------------------
def _unit(x) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def mean_pairwise_cosine(generated, reference) -> float:
    """Mean cosine similarity over all (generated, reference) pairs: CLIP-I / DINO. (N, D), (M, D) -> float."""
    return float((_unit(generated) @ _unit(reference).T).mean())


def mean_paired_cosine(images, texts) -> float:
    """Mean cosine similarity of row i of ``images`` with row i of ``texts`` (one text row broadcasts): CLIP-T."""
    images, texts = _unit(images), _unit(texts)
    return float((images * texts.expand_as(images)).sum(-1).mean())


def harmonic_balance(fidelity: list[float], alignment: list[float]) -> list[float]:
    """Per setting: harmonic mean of min-max normalised fidelity and alignment (the --select-beta rule)."""
    def normalised(values):
        values = np.asarray(values, dtype=float)
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            return np.ones_like(values)  # nothing judged on this axis: it cannot tell the settings apart
        if not finite.max() > finite.min():
            return np.where(np.isfinite(values), 1.0, 0.0)  # a tie counts 1 for all
        return np.where(np.isfinite(values), (values - finite.min()) / (finite.max() - finite.min()), 0.0)

    f, a = normalised(fidelity), normalised(alignment)
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = np.where(f + a > 0, 2 * f * a / (f + a), 0.0)
    return [float(s) if np.isfinite(s) else 0.0 for s in scores]


def select_balanced(rows: list[dict]) -> int:
    """Index of the balanced setting (first of equals)."""
    scores = harmonic_balance([r["fidelity"] for r in rows], [r["alignment"] for r in rows])
    return int(np.argmax(scores))


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (higher is better), sorted by x."""
    front = [i for i, (x, y) in enumerate(points)
             if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i][0])


# ----- the toy oracle as a metric -----------------------------------------------------------------------------
ALIGNMENT_CHECKS = ("background", "count", "both")  # what a prompt asks besides the concept (shape/colour: its own)


def toy_alignment(reading, superclass_prompt: str) -> bool | None:
    """Whether an image follows what the prompt asks for besides the concept; None when it asks for nothing else."""
    from data.toy_oracle import check

    judged = {k: v for k, v in check(reading, superclass_prompt).items() if k in ALIGNMENT_CHECKS}
    return all(judged.values()) if judged else None


def toy_prompt_scores(images, superclass_prompt: str, concept_names: list[str]) -> dict[str, float]:
    """fidelity (share of images showing each concept's pattern, mean over concepts) and alignment (share following
    the rest of the prompt; NaN when the prompt asks for nothing else) of one prompt's images."""
    from data.toy_oracle import concept_found, read_image

    readings = [read_image(image) for image in images]
    fidelity = np.mean([np.mean([concept_found(r, name) for name in concept_names]) for r in readings])
    judged = [toy_alignment(r, superclass_prompt) for r in readings]
    judged = [j for j in judged if j is not None]
    return {"fidelity": float(fidelity), "alignment": float(np.mean(judged)) if judged else float("nan")}


def toy_concept_names(paths: list[str], concepts, given: str | None) -> list[str]:
    from data.toy_world import CONCEPTS

    if given:
        names = [n.strip() for n in given.split(",") if n.strip()]
        unknown = [n for n in names if n not in CONCEPTS]
        if unknown or len(names) != len(paths):
            raise UsageError(f"--toy_concept {given}: give one of {sorted(CONCEPTS)} per concept file "
                             f"({len(paths)})")
        return names
    names = []
    for path, concept in zip(paths, concepts):
        stem = Path(path).stem
        by_class = [n for n, d in CONCEPTS.items() if d["superclass"] == concept.metadata.get("superclass")]
        if stem in CONCEPTS:
            names.append(stem)
        elif len(by_class) == 1:
            names.append(by_class[0])
        else:
            raise UsageError(f"--metric toy: cannot tell which toy concept {path} is; pass --toy_concept "
                             f"(one of {sorted(CONCEPTS)})")
    return names


# ----- networks -----------------------------------------------------------------------------------------------
class ClipEmbedder:
    """open_clip image and text embeddings. ``model``: an open_clip model name or a model-config JSON file;
    ``pretrained``: an open_clip tag (weights from the Hugging Face cache, downloaded when online) or a file."""

    def __init__(self, model: str, pretrained: str, device="cpu"):
        import open_clip

        name = model
        if model.endswith(".json"):
            if not Path(model).is_file():
                raise UsageError(f"--clip_model {model}: file not found")
            open_clip.add_model_config(Path(model))
            name = Path(model).stem
        if name not in open_clip.list_models():
            raise UsageError(f"--clip_model {model}: not an open_clip model (e.g. ViT-B-32, ViT-L-14; "
                             "see open_clip.list_models())")
        from_file = Path(pretrained).is_file()
        if not from_file and pretrained not in open_clip.list_pretrained_tags_by_model(name):
            raise UsageError(f"--clip_pretrained {pretrained}: neither a file nor a pretrained tag of {name} "
                             f"({', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'})")
        # OpenAI's weights (and a few others) were trained with QuickGELU, which the plain model configs lack
        quick_gelu = not from_file and bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu"))
        logging.disable(logging.CRITICAL)  # open_clip logs the failed download before raising
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu)
        except Exception as err:  # noqa: BLE001 - reported in one line; a download/cache failure has many types
            if from_file:
                raise UsageError(f"--clip_pretrained {pretrained}: cannot be loaded into open_clip {name} "
                                 f"({str(err).splitlines()[0][:200]})") from err
            hub = (open_clip.get_pretrained_cfg(name, pretrained).get("hf_hub") or "").strip("/")
            how = f"`hf download {hub}`" if hub else "a run with internet access"
            raise UsageError(f"the open_clip weights {name}/{pretrained} are not in the local cache and cannot be "
                             f"downloaded (offline?): get them with {how} on a machine with internet access, "
                             "or pass a weights file with --clip_pretrained PATH") from None
        finally:
            logging.disable(logging.NOTSET)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.device = device
        self.name = f"{name}/{Path(pretrained).name if from_file else pretrained}"

    @torch.no_grad()
    def images(self, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
        parts = [self.model.encode_image(torch.stack([self.preprocess(im.convert("RGB"))
                                                      for im in images[i:i + batch_size]]).to(self.device))
                 for i in range(0, len(images), batch_size)]
        return torch.cat(parts).float().cpu()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device)).float().cpu()


class DinoEmbedder:
    """CLS-token embeddings of a DINO ViT through transformers (AutoModel + AutoImageProcessor)."""

    def __init__(self, name: str, device="cpu"):
        from transformers import AutoImageProcessor, AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        self.processor = AutoImageProcessor.from_pretrained(name)
        self.model = AutoModel.from_pretrained(name).eval().to(device)
        self.device = device
        self.name = name

    @torch.no_grad()
    def images(self, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
        parts = []
        for i in range(0, len(images), batch_size):
            inputs = self.processor(images=[im.convert("RGB") for im in images[i:i + batch_size]],
                                    return_tensors="pt")
            out = self.model(pixel_values=inputs["pixel_values"].to(self.device))
            parts.append(out.last_hidden_state[:, 0].float().cpu())
        return torch.cat(parts)


def load_dino(name: str, device="cpu") -> tuple[DinoEmbedder | None, str | None]:
    """(embedder, None), or (None, a one-line note) when DINO is off or its weights are not on this machine."""
    if name.lower() in ("", "none", "off"):
        return None, None
    how = f"get it with `hf download {name}` or pass a local folder with --dino_model"
    if not Path(name).is_dir() and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):  # checked without loading transformers
            return None, f"note: DINO skipped: {name} is not in the local Hugging Face cache (offline); {how}"
    try:
        return DinoEmbedder(name, device), None
    except (OSError, ValueError, ImportError) as err:
        first = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        return None, f"note: DINO skipped: {name} could not be loaded ({first}); {how}"


# ----- inputs ---------------------------------------------------------------------------------------------------
def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line with {} (or {1}, {2}) for the concepts; blank lines and # comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--prompts {path}: file not found")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UsageError(f"--prompts {path} holds no prompts")
    return prompts


def training_images(folder: str | Path) -> list[Image.Image]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--train_images {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"--train_images {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it")
    return [Image.open(p).convert("RGB") for p in files]


def parse_values(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--{flag} {text}: give comma-separated numbers, e.g. --{flag} 0.5,0.6,0.7") from None
    if not values:
        raise UsageError(f"--{flag} {text}: give at least one value")
    return list(dict.fromkeys(values))


def concept_hash(concept) -> str:
    """Hash of a concept's tensors: what changes its images (its metadata, e.g. a stored beta, does not)."""
    digest = hashlib.sha1()
    tensors = [*concept.value_outputs.values(), concept.embedding, concept.target_input, concept.c_inv_target_input,
               concept.superclass_input, *((getattr(concept, "key_outputs", None) or {}).values())]
    for tensor in tensors:
        if tensor is not None:
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# ----- the sweep ----------------------------------------------------------------------------------------------
def setting_name(beta: float, tau: float, global_locking: bool) -> str:
    return f"beta{beta:g}_tau{tau:g}_{'global' if global_locking else 'local'}"


def setting_label(row: dict) -> str:
    return f"b{row['beta']:g} t{row['tau']:g}" + (" GL" if row["global_locking"] else "")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--personalized_ckpt", required=True, help="concept file(s), comma separated (as txt2img)")
    p.add_argument("--config", default="configs/perfusion_inference.yaml")
    p.add_argument("--ckpt", default="ckpt/v1-5-pruned-emaonly.ckpt", help="base model (as txt2img)")
    p.add_argument("--train_images", default=None,
                   help="folder of the concept's training images (one folder per concept file, comma separated); "
                        "needed by --metric clip")
    p.add_argument("--prompts", default=None,
                   help="prompt file, one prompt per line with {} (default: data/prompts/objects.txt, or "
                        "data/prompts/toy.txt with --metric toy; data/prompts/live_subjects.txt for pets/people)")
    p.add_argument("--n", type=int, default=8, help="images per prompt and setting")
    p.add_argument("--batch_size", type=int, default=8, help="images per sampling batch")
    p.add_argument("--beta", default="0.5,0.6,0.7,0.8", help="gate biases to sweep, comma separated")
    p.add_argument("--tau", default="0.15", help="gate temperatures to sweep, comma separated")
    p.add_argument("--global_locking", choices=["off", "on", "both"], default="off",
                   help="locking modes to sweep (txt2img's --global_locking): off, on or both")
    p.add_argument("--metric", choices=["clip", "toy"], default="clip",
                   help="clip: CLIP-I, CLIP-T (raw cosine similarities, not CLIPScore's 2.5x scaling) and DINO; "
                        "toy: the toy world's oracle")
    p.add_argument("--clip_model", default="ViT-B-32",
                   help="open_clip model name (or a model-config .json); similarities are raw cosines, NOT "
                        "CLIPScore's 2.5 * max(cos, 0)")
    p.add_argument("--clip_pretrained", default="openai",
                   help="open_clip pretrained tag (from the Hugging Face cache; HF_HUB_OFFLINE respected) or a "
                        "weights file (for OpenAI's weights as a file use --clip_model ViT-B-32-quickgelu)")
    p.add_argument("--dino_model", default="facebook/dinov2-small",
                   help="transformers DINO model name or folder (CLS token); 'none' turns DINO off; skipped with "
                        "a note when not available locally")
    p.add_argument("--fidelity", choices=["clip_i", "dino"], default="clip_i",
                   help="--metric clip: which image similarity is the fidelity axis of the plot and --select-beta")
    p.add_argument("--toy_concept", default=None,
                   help="--metric toy: toy concept name(s) (toy_star, toy_dots); default from the file name or "
                        "the super-class word")
    p.add_argument("--select-beta", dest="select_beta", action="store_true",
                   help="store the balanced setting's beta/tau in the concept file as its default (rule: "
                        + SELECTION_RULE + "); one concept file only")
    p.add_argument("--outdir", default="outputs/eval")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scale", type=float, default=6.0, help="classifier-free guidance scale")
    p.add_argument("--ddim_eta", type=float, default=0.0)
    p.add_argument("--plms", action="store_true")
    p.add_argument("--advanced_sampler", action="store_true")
    p.add_argument("--sampler_config", default="configs/sampler/sampler.yaml")
    p.add_argument("--denoiser_config", default="configs/denoiser/denoiser.yaml")
    p.add_argument("--seed", type=int, default=42, help="prompt i uses seed + i")
    p.add_argument("--H", type=int, default=None)
    p.add_argument("--W", type=int, default=None)
    p.add_argument("--C", type=int, default=None)
    p.add_argument("--f", type=int, default=None)
    p.add_argument("--precision", choices=["autocast", "full"], default="autocast")
    p.add_argument("--device", default=None)
    return p


class Sweep:
    """The model with its concepts, and the generation of one setting's images (resumable)."""

    def __init__(self, opt, config, paths, concepts, prompts, device):
        self.opt, self.paths, self.concepts, self.prompts, self.device = opt, paths, concepts, prompts, device
        self.model = load_model_from_config(config, opt.ckpt, device)
        self.placeholders = distinct_placeholders(concepts)
        self.superclasses = [c.metadata.get("superclass") or c.metadata["placeholder"] for c in concepts]
        if concepts:  # none: a fine-tuned base model sampled with its own words (scripts/toy_claims.py)
            self.model.load_concepts(concepts, placeholders=self.placeholders)
        for prompt in prompts:
            check_prompt_length(self.model.cond_stage_model, fill_prompt(prompt, self.placeholders),
                                self.placeholders)
        self.sampler, self.denoiser, self.sampler_name = make_sampler(opt, self.model, verbose=False)
        self.shape = (opt.C, opt.H // opt.f, opt.W // opt.f)
        self.hashes = [concept_hash(c) for c in concepts]
        self.generated = self.reused = 0

    def signature(self, setting, prompt_index: int, j: int) -> str:
        beta, tau, global_locking = setting
        opt = self.opt
        return json.dumps({"prompt": self.prompts[prompt_index], "seed": opt.seed + prompt_index, "index": j,
                           "beta": beta, "tau": tau, "global_locking": global_locking, "steps": opt.steps,
                           "scale": opt.scale, "eta": opt.ddim_eta, "sampler": self.sampler_name,
                           "concepts": self.hashes, "base_checkpoint": str(opt.ckpt),
                           "size": [opt.W, opt.H]}, sort_keys=True)

    def path(self, setting, prompt_index: int, j: int) -> Path:
        return (Path(self.opt.outdir) / setting_name(*setting) /
                f"p{prompt_index:03d}_seed{self.opt.seed + prompt_index}_{j:03d}.png")

    def existing(self, setting, prompt_index: int, j: int) -> Image.Image | None:
        path = self.path(setting, prompt_index, j)
        if not path.is_file():
            return None
        try:
            with Image.open(path) as image:
                if image.text.get("evaluate") != self.signature(setting, prompt_index, j):
                    return None
                return image.convert("RGB")
        except OSError:
            return None  # a truncated file of an interrupted run: generate it again

    def missing(self, setting) -> list[tuple[int, int]]:
        return [(i, j) for i in range(len(self.prompts)) for j in range(self.opt.n)
                if self.existing(setting, i, j) is None]

    def noise(self, prompt_index: int) -> torch.Tensor:
        """Prompt i's start noise: txt2img's with --seed seed + i and --n_samples n."""
        generator = torch.Generator(device=self.device).manual_seed(self.opt.seed + prompt_index)
        return torch.randn((self.opt.n, *self.shape), generator=generator, device=self.device)

    def install(self, beta: float, tau: float) -> None:
        """Load the concepts with the setting's gate, one beta/tau for all (a subclass may gate per concept)."""
        if self.concepts:
            k = len(self.concepts)
            self.model.load_concepts(self.concepts, beta=[beta] * k, tau=[tau] * k, placeholders=self.placeholders)

    @torch.no_grad()
    def run(self, setting, progress=None) -> list[list[Image.Image]]:
        """The setting's images, [prompt][j]: those on disk with a matching record, the rest generated."""
        beta, tau, global_locking = setting
        opt, model = self.opt, self.model
        self.install(beta, tau)
        images = [[self.existing(setting, i, j) for j in range(opt.n)] for i in range(len(self.prompts))]
        jobs = [(i, j) for i, row in enumerate(images) for j, image in enumerate(row) if image is None]
        self.reused += len(images) * opt.n - len(jobs)
        noises = {i: self.noise(i) for i in sorted({i for i, _ in jobs})}
        autocast = (torch.autocast("cuda", dtype=torch.float16)
                    if opt.precision == "autocast" and self.device.type == "cuda" else nullcontext())
        self.path(setting, 0, 0).parent.mkdir(parents=True, exist_ok=True)
        for start in range(0, len(jobs), opt.batch_size):
            batch = jobs[start:start + opt.batch_size]
            with autocast:
                texts, c, uc = encode_prompts(model, [self.prompts[i] for i, _ in batch], self.placeholders,
                                              self.superclasses, "", global_locking)
                x_T = torch.stack([noises[i][j] for i, j in batch])
                generator = torch.Generator(device=self.device).manual_seed(opt.seed + batch[0][0])
                try:
                    batch_images = sample_images(model, c, uc, x_T, self.sampler, self.denoiser, generator)
                finally:
                    if global_locking:
                        model.set_global_locking(None)
            for (i, j), text, image in zip(batch, texts, batch_images):
                fields = {"prompt": self.prompts[i], "text": text, "seed": opt.seed + i, "index": j,
                          "sampler": self.sampler_name, "steps": opt.steps, "scale": opt.scale,
                          "eta": opt.ddim_eta, "beta": f"{beta:g}", "tau": f"{tau:g}",
                          "global_locking": global_locking, "concepts": ",".join(self.paths),
                          "base_checkpoint": opt.ckpt, "evaluate": self.signature(setting, i, j)}
                info = png_info(fields)
                atomic_write(self.path(setting, i, j),  # an interrupted run leaves no half-written image
                             lambda temporary, image=image, info=info: image.save(temporary, format="PNG",
                                                                                  pnginfo=info))
                images[i][j] = image
            self.generated += len(batch)
            if progress is not None:
                progress.update(len(batch))
        return images


def score_setting(opt, images, superclass_prompts, references, backends) -> dict[str, list[float]]:
    """Per-prompt values of every metric: {metric: [value of prompt i]}."""
    values: dict[str, list[float]] = {}
    for i, prompt_images in enumerate(images):
        if opt.metric == "toy":
            scores = toy_prompt_scores(prompt_images, superclass_prompts[i], backends["toy_names"])
        else:
            clip = backends["clip"].images(prompt_images)
            scores = {"clip_i": float(np.mean([mean_pairwise_cosine(clip, ref) for ref in references["clip"]])),
                      "clip_t": mean_paired_cosine(clip, references["clip_t"][i:i + 1])}
            if backends.get("dino") is not None:
                dino = backends["dino"].images(prompt_images)
                scores["dino"] = float(np.mean([mean_pairwise_cosine(dino, ref) for ref in references["dino"]]))
        for key, value in scores.items():
            values.setdefault(key, []).append(value)
    return values


def summarise(setting, per_prompt: dict[str, list[float]], opt, n_prompts: int) -> dict:
    beta, tau, global_locking = setting
    row = {"setting": setting_name(*setting), "beta": beta, "tau": tau, "global_locking": global_locking,
           "n": opt.n, "prompts": n_prompts}
    for key, values in per_prompt.items():
        array = np.asarray(values, dtype=float)
        judged = array[np.isfinite(array)]
        row[key] = float(judged.mean()) if judged.size else float("nan")
        row[f"{key}_std"] = float(judged.std()) if judged.size else float("nan")
    if opt.metric == "clip":
        row["fidelity"], row["alignment"] = row[opt.fidelity], row["clip_t"]
    return row


def write_csv(rows: list[dict], path: Path) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def pareto_plot(rows: list[dict], path: Path, x_label: str, y_label: str, balanced: int | None = None,
                width: int = 720, height: int = 520) -> None:
    """Alignment (y) against fidelity (x), one labelled point per setting (PIL only): the Pareto front as a line,
    local locking blue, global locking orange, the balanced setting ringed."""
    left, right, top, bottom = 70, 30, 40, 60
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    points = [(r["fidelity"], r["alignment"]) for r in rows]
    finite = [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    xs, ys = [p[0] for p in finite] or [0.0], [p[1] for p in finite] or [0.0]

    def span(values):
        low, high = min(values), max(values)
        pad = (high - low) * 0.12 or max(abs(high) * 0.05, 0.01)
        return low - pad, high + pad

    (x0, x1), (y0, y1) = span(xs), span(ys)
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(x, y):
        return left + plot_w * (x - x0) / (x1 - x0), top + plot_h * (1 - (y - y0) / (y1 - y0))

    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=(0, 0, 0))
    for k in range(5):
        vx, vy = x0 + (x1 - x0) * k / 4, y0 + (y1 - y0) * k / 4
        px, py = xy(vx, vy)
        draw.line([(px, top), (px, top + plot_h)], fill=(230, 230, 230))
        draw.line([(left, py), (left + plot_w, py)], fill=(230, 230, 230))
        draw.text((px - 14, top + plot_h + 6), f"{vx:.3f}", fill=(0, 0, 0))
        draw.text((8, py - 6), f"{vy:.3f}", fill=(0, 0, 0))
    draw.text((left + plot_w // 2 - 60, height - 24), f"fidelity: {x_label}", fill=(0, 0, 0))
    draw.text((left, 8), f"alignment: {y_label}   (up and right is better; grey line: Pareto front)",
              fill=(0, 0, 0))
    draw.text((left, 22), "blue: local locking, orange: global locking (GL), ringed: balanced", fill=(90, 90, 90))
    front = [i for i in pareto_front(points) if math.isfinite(points[i][0]) and math.isfinite(points[i][1])]
    if len(front) > 1:
        draw.line([xy(*points[i]) for i in front], fill=(160, 160, 160), width=2)
    placed: list[tuple[float, float]] = []
    for i, (row, (x, y)) in enumerate(zip(rows, points)):
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        px, py = xy(x, y)
        stacked = sum(abs(px - qx) < 60 and abs(py - qy) < 12 for qx, qy in placed)  # labels of close points
        placed.append((px, py))
        colour = (230, 120, 0) if row["global_locking"] else (40, 80, 220)
        draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=colour)
        if i == balanced:
            draw.ellipse([px - 10, py - 10, px + 10, py + 10], outline=(200, 0, 0), width=2)
        label = setting_label(row) + (" (balanced)" if i == balanced else "")
        text_x = px + 8 if px + 8 + draw.textlength(label) < width - 4 else px - 8 - draw.textlength(label)
        draw.text((text_x, py - 14 + 13 * stacked), label, fill=(0, 0, 0))
    image.save(path)


def write_sheet(images_by_setting: list[list[list[Image.Image]]], rows: list[dict], prompts: list[str],
                path: Path) -> None:
    """First image of every prompt (rows) in every setting (columns)."""
    from perfusion.validation import labelled_grid

    tiles = [[np.asarray(setting[i][0]) for setting in images_by_setting] for i in range(len(prompts))]
    side = 96 if tiles[0][0].shape[0] <= 64 else 128
    labelled_grid(tiles, prompts, [setting_label(r) for r in rows], tile_side=side, label_width=240).save(path)


def main(argv=None) -> int:
    return run_command(evaluate, get_parser().parse_args(argv))


def evaluate(opt) -> int:
    from omegaconf import OmegaConf
    from tqdm import tqdm

    # ----- everything that can be checked before the networks load
    paths = [p.strip() for p in opt.personalized_ckpt.split(",") if p.strip()]
    for flag, path in (("--config", opt.config), ("--ckpt", opt.ckpt)):
        if not (Path(path).is_file() or (flag == "--ckpt" and Path(path).is_dir())):
            raise UsageError(f"{flag} {path}: file not found")
    for flag in ("n", "batch_size", "steps"):
        if getattr(opt, flag) < 1:
            raise UsageError(f"--{flag} {getattr(opt, flag)}: must be at least 1")
    prompts = read_prompt_file(opt.prompts or PROMPT_SETS[opt.metric])
    betas, taus = parse_values(opt.beta, "beta"), parse_values(opt.tau, "tau")
    if any(t <= 0 for t in taus):
        raise UsageError(f"--tau must be > 0, got {opt.tau}")
    modes = {"off": [False], "on": [True], "both": [False, True]}[opt.global_locking]
    if opt.select_beta and len(paths) != 1:
        raise UsageError(f"--select-beta stores a default in one concept file; {len(paths)} were given (evaluate "
                         "each concept on its own)")
    folders = [f.strip() for f in (opt.train_images or "").split(",") if f.strip()]
    if opt.metric == "clip":
        if not folders:
            raise UsageError("--metric clip needs --train_images (the folder of the concept's training images)")
        if len(folders) not in (1, len(paths)):
            raise UsageError(f"--train_images: give one folder, or one per concept file ({len(paths)})")
    config = OmegaConf.load(opt.config)
    fill_image_geometry(opt, config)
    check_prompts(prompts, len(paths))
    concepts = load_and_check_concepts(paths, config)
    superclasses = [c.metadata.get("superclass") or c.metadata["placeholder"] for c in concepts]
    superclass_prompts = [fill_prompt(p, superclasses) for p in prompts]
    device = torch.device(opt.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # ----- the metric's networks (before generation, so that missing weights stop the run at once)
    backends: dict = {}
    references: dict = {}
    notes = []
    if opt.metric == "toy":
        backends["toy_names"] = toy_concept_names(paths, concepts, opt.toy_concept)
    else:
        backends["clip"] = ClipEmbedder(opt.clip_model, opt.clip_pretrained, device)
        backends["dino"], note = load_dino(opt.dino_model, device)
        if note:
            notes.append(note)
            print(note, flush=True)
        if opt.fidelity == "dino" and backends["dino"] is None:
            raise UsageError("--fidelity dino needs DINO weights: " + (note or "--dino_model is none"))
        train = [training_images(f) for f in (folders if len(folders) == len(paths) else folders * len(paths))]
        references["clip"] = [backends["clip"].images(t) for t in train]
        references["clip_t"] = backends["clip"].texts(superclass_prompts)
        if backends["dino"] is not None:
            references["dino"] = [backends["dino"].images(t) for t in train]

    sweep = Sweep(opt, config, paths, concepts, prompts, device)
    if True in modes:
        check_global_locking_words(sweep.model, paths, superclasses)
    settings = [(beta, tau, mode) for mode in modes for tau in taus for beta in betas]
    outdir = Path(opt.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    total = sum(len(sweep.missing(s)) for s in settings)
    print(f"{len(settings)} settings x {len(prompts)} prompts x {opt.n} images: {total} to generate, "
          f"{len(settings) * len(prompts) * opt.n - total} on disk", flush=True)
    rows, all_images = [], []
    with tqdm(total=total, unit="img", desc="generating", disable=total == 0) as progress:
        for setting in settings:
            progress.set_postfix_str(setting_name(*setting))
            images = sweep.run(setting, progress)
            rows.append(summarise(setting, score_setting(opt, images, superclass_prompts, references, backends),
                                  opt, len(prompts)))
            all_images.append(images)

    balance = harmonic_balance([r["fidelity"] for r in rows], [r["alignment"] for r in rows])
    balanced = select_balanced(rows)
    for row, score in zip(rows, balance):
        row["balance"] = score
    write_csv(rows, outdir / "results.csv")
    x_label = {"toy": "toy oracle, concept found", "clip_i": f"CLIP-I ({backends.get('clip') and backends['clip'].name})",
               "dino": "DINO"}["toy" if opt.metric == "toy" else opt.fidelity]
    y_label = "toy oracle, rest of prompt followed" if opt.metric == "toy" else "CLIP-T (super-class prompt)"
    pareto_plot(rows, outdir / "pareto.png", x_label, y_label, balanced)
    write_sheet(all_images, rows, prompts, outdir / "sheet.png")

    metric_keys = [k for k in rows[0] if k not in ("setting", "beta", "tau", "global_locking", "n", "prompts")
                   and not k.endswith("_std")]
    print("setting".ljust(28) + "".join(k.rjust(11) for k in metric_keys))
    for row in rows:
        print(row["setting"].ljust(28) + "".join(f"{row[k]:11.4f}" for k in metric_keys))
    best = rows[balanced]
    print(f"balanced setting: {best['setting']} ({SELECTION_RULE})")
    print(f"generated {sweep.generated} images, reused {sweep.reused}")
    print(f"results: {outdir / 'results.csv'}, plot: {outdir / 'pareto.png'}, sheet: {outdir / 'sheet.png'}")
    scored = {tuple(round(r[k], 9) if math.isfinite(r[k]) else None for k in ("fidelity", "alignment"))
              for r in rows}
    if opt.select_beta and len(scored) == 1 and len(rows) > 1:
        print(f"--select-beta: every setting scores the same (fidelity {best['fidelity']:.4f}, alignment "
              f"{best['alignment']:.4f}), so there is nothing to select; {paths[0]} is left unchanged")
    elif opt.select_beta:
        from perfusion.concept_file import SELECTED_BY_KEY, update_concept_metadata

        record = {"rule": SELECTION_RULE, "tool": "scripts/evaluate.py",
                  "metric": "toy oracle" if opt.metric == "toy" else f"open_clip {backends['clip'].name}",
                  "fidelity": "toy concept_found" if opt.metric == "toy" else opt.fidelity,
                  "alignment": "toy rest of prompt" if opt.metric == "toy" else "clip_t",
                  "global_locking": bool(best["global_locking"]),
                  "prompts": str(opt.prompts or PROMPT_SETS[opt.metric]), "n": opt.n, "steps": opt.steps,
                  "scale": opt.scale,
                  "settings": [[r["beta"], r["tau"], bool(r["global_locking"]), round(r["fidelity"], 5),
                                round(r["alignment"], 5), round(r["balance"], 5)] for r in rows],
                  "settings_columns": ["beta", "tau", "global_locking", "fidelity", "alignment", "balance"]}
        update_concept_metadata(paths[0], {"beta": best["beta"], "tau": best["tau"], SELECTED_BY_KEY: record})
        print(f"--select-beta: {paths[0]} now defaults to beta {best['beta']:g}, tau {best['tau']:g}"
              + (" (for --global_locking)" if best["global_locking"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
