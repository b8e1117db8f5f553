"""Score toy base-model checkpoints with the toy oracle: the learning curve of ckpt/toy/README.md.

    python scripts/toy_eval.py --ckpt logs/toy/<run>/checkpoints/base-step*.safetensors --n 32 --csv curve.csv

For each checkpoint it samples (DDIM, classifier-free guidance, fixed seeds) three prompt sets and reads every
image with data/toy_oracle.py:
- ``seen``: one-object captions of (colour, shape) pairs seen as single objects in pretraining;
- ``held_out``: one-object captions of the held-out pairs (never a single object in pretraining);
- ``two``: two-object captions (both objects right, colour bound to the right shape).
It prints one row per checkpoint, appends it to ``--csv``; ``--plot`` draws the curve of all rows of the CSV and
``--sheet`` writes a labelled sheet of the last checkpoint's samples. ``--readout`` measures instead where the model
reads an object (the same seen captions with parts of their encodings emptied).
"""
from __future__ import annotations

import argparse
import csv
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from data.toy_oracle import check, read_image  # noqa: E402
from data.toy_world import BACKGROUNDS, COLOURS, HELD_OUT_PAIRS, SHAPES  # noqa: E402
from ldm.modules.encoders.modules import first_eos_positions  # noqa: E402

DEFAULT_CONFIG = "configs/toy/inference.yaml"


@torch.no_grad()
def sample(model, prompts: list[str], steps: int = 25, scale: float = 4.0, seed: int = 0,
           batch_size: int = 32, contexts: torch.Tensor | None = None) -> list[np.ndarray]:
    """DDIM samples (eta 0) of ``prompts`` as uint8 HxWx3 arrays; image i always starts from the same noise.
    ``contexts``: the prompts' text encodings given directly (e.g. with some positions replaced)."""
    from sgm.sampling import sample as sample_model

    shape = (model.channels, model.image_size, model.image_size)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(prompts), *shape), generator=generator)
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        c = model.get_learned_conditioning(batch) if contexts is None else contexts[start:start + len(batch)]
        uc = model.get_learned_conditioning([""] * len(batch))
        latents = sample_model(model, c, noise[start:start + len(batch)].to(model.device), uc, steps=steps,
                               scale=scale)
        x = model.decode_first_stage(latents).clamp(-1, 1)
        images += list(((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return images


def prompt_sets(n: int, seed: int = 0) -> dict[str, list[str]]:
    rng = random.Random(seed)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    seen = [p for p in pairs if p not in HELD_OUT_PAIRS]
    backgrounds = list(BACKGROUNDS)

    def one(pair_list):
        return [f"a {c} {s} on a {rng.choice(backgrounds)} background" for c, s in
                (pair_list[i % len(pair_list)] for i in range(n))]

    two = []
    for _ in range(n):
        (c1, s1), (c2, s2) = rng.sample(pairs, 2)
        two.append(f"a {c1} {s1} and a {c2} {s2} on a {rng.choice(backgrounds)} background")
    return {"seen": one(seen), "held_out": one(list(HELD_OUT_PAIRS)), "two": two}


def score(images: list[np.ndarray], prompts: list[str]) -> dict[str, float]:
    results: dict[str, list[bool]] = {}
    for image, prompt in zip(images, prompts):
        for key, ok in check(read_image(image), prompt).items():
            results.setdefault(key, []).append(ok)
    return {key: float(np.mean(v)) for key, v in results.items()}


def evaluate(model, n: int = 32, steps: int = 25, scale: float = 4.0, seed: int = 0):
    """{set: {attribute: accuracy}} and the samples, per prompt set."""
    scores, samples = {}, {}
    for name, prompts in prompt_sets(n, seed).items():
        images = sample(model, prompts, steps, scale, seed)
        scores[name], samples[name] = score(images, prompts), (prompts, images)
    return scores, samples


READOUTS = ("full", "words only", "summary only", "up to the noun", "noun alone")


@torch.no_grad()
def readout_contexts(model, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Where the base model reads a one-object caption: its encodings with the positions a variant leaves out
    replaced by the empty caption's at the same positions. ``words only``: EOS and padding emptied; ``summary
    only``: the words emptied; ``up to the noun``: everything after the shape word; ``noun alone``: everything but
    BOS and the shape word."""
    encoder = model.cond_stage_model
    c = model.get_learned_conditioning(prompts)
    empty = model.get_learned_conditioning([""] * len(prompts)).to(c.dtype)
    tokens = encoder.tokenize(prompts).to(c.device)
    first_eos = first_eos_positions(tokens, encoder.eos_token_id)[:, None]
    shape_ids = torch.tensor([int(encoder.tokenize(shape)[0, 1]) for shape in SHAPES], device=c.device)
    is_noun = torch.isin(tokens, shape_ids)
    if not bool((is_noun.sum(1) == 1).all()):
        raise ValueError("readout needs one-object captions with exactly one shape word each")
    position = torch.arange(tokens.shape[1], device=c.device)[None]
    noun = is_noun.int().argmax(1)[:, None]
    keep = {"full": torch.ones_like(tokens, dtype=torch.bool), "words only": position < first_eos,
            "summary only": (position == 0) | (position >= first_eos), "up to the noun": position <= noun,
            "noun alone": (position == 0) | (position == noun)}
    return {name: torch.where(keep[name][..., None], c, empty) for name in READOUTS}


def readout(model, n: int = 32, steps: int = 25, scale: float = 4.0, seed: int = 0) -> dict[str, dict[str, float]]:
    """{variant: {attribute: accuracy}} on ``n`` one-object captions of seen pairs (see readout_contexts)."""
    prompts = prompt_sets(n, seed)["seen"]
    return {name: score(sample(model, prompts, steps, scale, seed, contexts=contexts), prompts)
            for name, contexts in readout_contexts(model, prompts).items()}


def flat_row(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{s}/{k}": v for s, d in scores.items() for k, v in d.items()}


def labelled_sheet(samples: dict[str, tuple[list[str], list[np.ndarray]]], per_row: int = 8,
                   factor: int = 3) -> Image.Image:
    tile = 32 * factor
    rows = [(name, prompts[i], image) for name, (prompts, images) in samples.items()
            for i, image in enumerate(images[:per_row])]
    sheet = Image.new("RGB", (tile + 460, len(rows) * (tile + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (name, prompt, image) in enumerate(rows):
        sheet.paste(Image.fromarray(image).resize((tile, tile), Image.Resampling.NEAREST), (0, r * (tile + 2)))
        draw.text((tile + 8, r * (tile + 2) + tile // 2 - 10), f"[{name}] {prompt}", fill=(0, 0, 0))
        draw.text((tile + 8, r * (tile + 2) + tile // 2 + 4), read_image(image).summary(), fill=(90, 90, 90))
    return sheet


CURVES = [("seen/all", "one object, seen pairs: all right", (40, 80, 220)),
          ("held_out/all", "one object, held-out pairs: all right", (240, 150, 0)),
          ("two/both", "two objects: both right, bound", (220, 40, 40))]


def plot_curve(rows: list[dict], path: str | Path, width: int = 640, height: int = 360) -> None:
    """Oracle accuracy against training steps, one line per prompt set (PIL only)."""
    rows = sorted(rows, key=lambda r: float(r["step"]))
    left, right, top, bottom = 50, 20, 20, 90
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    max_step = max(float(r["step"]) for r in rows) or 1.0
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(step, value):
        return left + plot_w * float(step) / max_step, top + plot_h * (1 - float(value))

    for level in (0, 0.25, 0.5, 0.7, 0.9, 1.0):
        y = xy(0, level)[1]
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        draw.text((8, y - 6), f"{100 * level:.0f}%", fill=(0, 0, 0))
    draw.rectangle([left, top, width - right, top + plot_h], outline=(0, 0, 0))
    for k in range(5):
        step = max_step * k / 4
        draw.text((xy(step, 0)[0] - 12, top + plot_h + 4), f"{step:.0f}", fill=(0, 0, 0))
    draw.text((left + plot_w // 2 - 40, top + plot_h + 18), "training steps", fill=(0, 0, 0))
    for i, (key, label, colour) in enumerate(CURVES):
        points = [xy(r["step"], r[key]) for r in rows if r.get(key) not in (None, "")]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        draw.line([(left, height - 42 + 14 * i), (left + 20, height - 42 + 14 * i)], fill=colour, width=2)
        draw.text((left + 26, height - 48 + 14 * i), label, fill=(0, 0, 0))
    image.save(path)


def step_of(path: str) -> int:
    match = re.search(r"step(\d+)", Path(path).name)
    return int(match.group(1)) if match else -1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", nargs="+", required=True, help="base checkpoints (original layout)")
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--n", type=int, default=32, help="samples per prompt set")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--scale", type=float, default=4.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", help="append one row per checkpoint to this CSV")
    parser.add_argument("--sheet", help="PNG sheet of the last checkpoint's samples, read by the oracle")
    parser.add_argument("--plot", help="PNG learning curve of all rows in --csv")
    parser.add_argument("--readout", action="store_true",
                        help="instead of the sets: where the model reads an object (full caption, words only, summary "
                             "only, up to the noun, noun alone; ckpt/toy/README.md)")
    parser.add_argument("--step_offset", type=int, default=0,
                        help="added to the step in the file names (a run that trained on from an earlier export)")
    args = parser.parse_args(argv)
    for path in args.ckpt:
        if not Path(path).is_file():
            print(f"error: --ckpt {path}: file not found", file=sys.stderr)
            return 2
    from omegaconf import OmegaConf

    from ldm.util import load_model_from_config

    model = load_model_from_config(OmegaConf.load(args.config))
    samples = None
    for path in sorted(args.ckpt, key=step_of):
        model.init_from_ckpt(path)
        if args.readout:
            for name, accuracy in readout(model, args.n, args.steps, args.scale, args.seed).items():
                print(f"{path}  {name}: " + "  ".join(f"{k}={v:.2f}" for k, v in accuracy.items()), flush=True)
            continue
        scores, samples = evaluate(model, args.n, args.steps, args.scale, args.seed)
        row = {"checkpoint": path, "step": step_of(path) + args.step_offset, **flat_row(scores)}
        print("  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        if args.csv:
            new = not Path(args.csv).is_file()
            with open(args.csv, "a", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(row))
                if new:
                    writer.writeheader()
                writer.writerow(row)
    if args.plot and args.csv:
        with open(args.csv) as fh:
            plot_curve(list(csv.DictReader(fh)), args.plot)
        print(f"learning curve written to {args.plot}")
    if args.sheet and samples is not None:
        labelled_sheet(samples).save(args.sheet)
        print(f"sheet written to {args.sheet}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
