"""The toy world: captioned 32x32 RGB images of coloured shapes, deterministic by seed, with exact masks.

It is small enough for a text-to-image model to master on two CPU cores in a couple of hours, and it runs
through the same classes as Stable Diffusion (see configs/toy/base.yaml). Vocabulary:

- shapes: circle, square, triangle, star
- object colours: red, green, blue, yellow
- backgrounds: black, white

Captions: ``a {colour} {shape} on a {background} background`` (one object) and
``a {colour} {shape} and a {colour} {shape} on a {background} background`` (two objects side by side, named in
random order), plus shortened forms with the colour and/or background left out (the image still has one) and an
optional ``a photo of`` prefix, so that prompts such as "a photo of a star" mean something to the model.
The (colour, shape) pairs in ``HELD_OUT_PAIRS`` never appear as a single object in pretraining: they test
generalisation.

Two toy *concepts* that the base model cannot draw but whose super-class it knows:
- ``toy_star``: an orange star (super-class ``star``); orange is a colour the world never shows, so the base model
  cannot draw it from words;
- ``toy_dots``: a blue square with four yellow dots (super-class ``square``).

Run ``python data/toy_world.py --concepts training_data`` to write their training images and soft masks,
``--sheet out.png`` for a labelled sheet of rendered examples, ``--captions toy_captions.txt`` for the captions
from which ``data/estimate_C_inv.py`` estimates C^-1 of the toy text encoder.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

SIZE = 32  # image side in pixels
SUPERSAMPLE = 4  # drawn at SIZE * SUPERSAMPLE, then box-downsampled (antialiasing)

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40)}
# Colours only the toy concepts have (never in a caption or a pretraining image).
CONCEPT_COLOURS = {"orange": (245, 130, 20)}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255)}
HELD_OUT_PAIRS = (("blue", "triangle"), ("yellow", "circle"))  # never a single object in pretraining

CONCEPTS = {
    "toy_star": {"superclass": "star", "description": "an orange star (a colour the world never shows)"},
    "toy_dots": {"superclass": "square", "description": "a blue square with four yellow dots"},
}


@dataclass(frozen=True)
class ToyObject:
    """One drawn object: ``shape`` of ``colour`` (or a concept's name as ``pattern``) in a box (pixels)."""

    shape: str
    colour: str
    cx: float
    cy: float
    radius: float
    pattern: str | None = None


@dataclass
class ToyScene:
    background: str
    objects: list[ToyObject] = field(default_factory=list)


# ----- drawing ---------------------------------------------------------------------------------------------
def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of ``shape`` centred at (cx, cy) with circumradius ``r`` (None for a circle)."""
    if shape == "circle":
        return None
    if shape == "square":
        h = r * 0.8
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # upright, its box centred on (cx, cy)
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "star":  # five points, one up; inner radius 0.45 r
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle) + 0.1 * r))
        return points
    raise ValueError(f"unknown shape '{shape}'; known: {', '.join(SHAPES)}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    polygon = shape_polygon(shape, cx, cy, r)
    if polygon is None:
        draw.ellipse([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], fill=fill)
    else:
        draw.polygon(polygon, fill=fill)


def _object_layers(obj: ToyObject, scale: int) -> tuple[Image.Image, Image.Image]:
    """(RGB paint, L silhouette) of one object at ``scale`` x the image size."""
    big = SIZE * scale
    cx, cy, r = obj.cx * scale, obj.cy * scale, obj.radius * scale
    silhouette = Image.new("L", (big, big), 0)
    _draw_shape(ImageDraw.Draw(silhouette), obj.shape, cx, cy, r, 255)
    paint = Image.new("RGB", (big, big), COLOURS.get(obj.colour, (0, 0, 0)))
    if obj.pattern == "toy_star":  # the whole star orange
        paint = Image.new("RGB", (big, big), CONCEPT_COLOURS["orange"])
    elif obj.pattern == "toy_dots":  # blue square, four yellow dots in a 2x2 grid
        paint = Image.new("RGB", (big, big), COLOURS["blue"])
        d, dot = r * 0.38, r * 0.2
        draw = ImageDraw.Draw(paint)
        for sx in (-1, 1):
            for sy in (-1, 1):
                draw.ellipse([cx + sx * d - dot, cy + sy * d - dot, cx + sx * d + dot, cy + sy * d + dot],
                             fill=COLOURS["yellow"])
    elif obj.pattern is not None:
        raise ValueError(f"unknown pattern '{obj.pattern}'; known: {', '.join(CONCEPTS)}")
    return paint, silhouette


def render(scene: ToyScene) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 HxWx3, masks float32 KxHxW in [0, 1]): each mask is its object's exact antialiased coverage
    (the fraction of the pixel the object covers, occlusion by later objects included)."""
    big = SIZE * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    coverages = []
    for obj in scene.objects:
        paint, silhouette = _object_layers(obj, SUPERSAMPLE)
        canvas.paste(paint, (0, 0), silhouette)
        coverages = [np.minimum(c, 255 - np.asarray(silhouette)) for c in coverages]
        coverages.append(np.asarray(silhouette))
    image = np.asarray(canvas.resize((SIZE, SIZE), Image.Resampling.BOX))
    masks = [np.asarray(Image.fromarray(c.astype(np.uint8)).resize((SIZE, SIZE), Image.Resampling.BOX),
                        dtype=np.float32) / 255.0 for c in coverages]
    return image, np.stack(masks) if masks else np.zeros((0, SIZE, SIZE), np.float32)


# ----- scenes and captions ---------------------------------------------------------------------------------
def object_phrase(obj: ToyObject, with_colour: bool = True) -> str:
    return f"{obj.colour} {obj.shape}" if with_colour else obj.shape


def caption_for(scene: ToyScene, with_colour: bool = True, with_background: bool = True,
                prefix: str = "") -> str:
    """Natural-language caption of a scene: 'a red star and a blue circle on a white background'."""
    objects = " and ".join(f"a {object_phrase(o, with_colour)}" for o in scene.objects)
    text = f"{prefix}{objects}"
    return f"{text} on a {scene.background} background" if with_background else text


def one_object_scene(rng: random.Random, colour: str, shape: str, background: str) -> ToyScene:
    r = rng.uniform(7.0, 10.0)
    return ToyScene(background, [ToyObject(shape, colour, SIZE / 2 + rng.uniform(-4, 4),
                                           SIZE / 2 + rng.uniform(-4, 4), r)])


def two_object_scene(rng: random.Random, first: tuple[str, str], second: tuple[str, str],
                     background: str) -> ToyScene:
    """Two objects, one in each half; ``first`` is named first but lands left or right at random."""
    sides = [0.27, 0.73]
    rng.shuffle(sides)
    objects = [ToyObject(shape, colour, SIZE * side + rng.uniform(-1.5, 1.5), SIZE / 2 + rng.uniform(-5, 5),
                         rng.uniform(5.5, 6.5)) for (colour, shape), side in zip((first, second), sides)]
    return ToyScene(background, objects)


class ToyWorld:
    """Draws (image, caption, masks) samples; sample ``index`` of seed ``seed`` is always the same.

    two_object_p: share of two-object scenes. short_caption_p: share of one-object captions that leave out the
    colour and/or the background. photo_prefix_p: share of captions starting with 'a photo of'.
    caption_dropout: share of empty captions (trains the unconditional branch for classifier-free guidance).
    hold_out: (colour, shape) pairs never drawn as a single object.
    """

    def __init__(self, seed: int = 0, two_object_p: float = 0.5, short_caption_p: float = 0.2,
                 photo_prefix_p: float = 0.15, caption_dropout: float = 0.1,
                 hold_out: Sequence[Sequence[str]] = HELD_OUT_PAIRS):
        for name, p in (("two_object_p", two_object_p), ("short_caption_p", short_caption_p),
                        ("photo_prefix_p", photo_prefix_p), ("caption_dropout", caption_dropout)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"ToyWorld: {name} must lie in [0, 1], got {p}")
        self.seed = seed
        self.two_object_p, self.short_caption_p = two_object_p, short_caption_p
        self.photo_prefix_p, self.caption_dropout = photo_prefix_p, caption_dropout
        self.hold_out = {tuple(pair) for pair in hold_out}
        self.pairs = [(c, s) for c in COLOURS for s in SHAPES]
        self.single_pairs = [p for p in self.pairs if p not in self.hold_out]

    def rng(self, index: int) -> random.Random:
        return random.Random(self.seed * 1_000_003 + index)

    def scene(self, index: int) -> tuple[ToyScene, str]:
        rng = self.rng(index)
        background = rng.choice(list(BACKGROUNDS))
        prefix = "a photo of " if rng.random() < self.photo_prefix_p else ""
        if rng.random() < self.two_object_p:
            first, second = rng.sample(self.pairs, 2)
            scene = two_object_scene(rng, first, second, background)
            caption = caption_for(scene, prefix=prefix)
        else:
            colour, shape = rng.choice(self.single_pairs)
            scene = one_object_scene(rng, colour, shape, background)
            with_colour = with_background = True
            if rng.random() < self.short_caption_p:
                with_colour, with_background = rng.choice([(False, True), (True, False), (False, False)])
            caption = caption_for(scene, with_colour, with_background, prefix)
        if rng.random() < self.caption_dropout:
            caption = ""
        return scene, caption

    def sample(self, index: int) -> tuple[np.ndarray, str, np.ndarray]:
        scene, caption = self.scene(index)
        image, masks = render(scene)
        return image, caption, masks

    def vocabulary(self) -> list[str]:
        words = {"a", "and", "on", "background", "photo", "of", *SHAPES, *COLOURS, *BACKGROUNDS}
        return sorted(words)


VOCABULARY_TEMPLATES = ("a {}", "a photo of a {}", "a {} {} on a {} background",
                        "a {} {} and a {} {} on a {} background", "a {} and a {}")


def captions_for_c_inv(n: int, seed: int = 1) -> list[str]:
    """Captions for estimating C^-1 of the toy text encoder: ``n`` of the world's own (non-empty) and ``n`` of its
    templates filled with random words of the CLIP vocabulary.

    Why the second half: C should describe text in general, as the paper's 100K LAION captions do for real CLIP.
    The world's 17 words leave most directions of the encoder's space without variance, and C^-1 would amplify
    exactly those directions, in which a newly learned concept embedding differs from every caption; the gate
    would then open on every token that merely attends to the concept. Random words give those directions the
    variance a real vocabulary has.
    """
    import json
    import re

    from ldm.modules.encoders.modules import clip_tokenizer_dir

    world = ToyWorld(seed=seed, caption_dropout=0.0)
    captions = [world.scene(i)[1] for i in range(n)]
    vocabulary = json.loads((clip_tokenizer_dir() / "vocab.json").read_text())
    words = sorted(w[:-4] for w in vocabulary if w.endswith("</w>") and re.fullmatch(r"[a-z]{3,10}", w[:-4]))
    rng = random.Random(seed)
    for _ in range(n):
        template = rng.choice(VOCABULARY_TEMPLATES)
        captions.append(template.format(*(rng.choice(words) for _ in range(template.count("{}")))))
    return captions


# ----- torch dataset ---------------------------------------------------------------------------------------
class ToyWorldDataset:
    """Map-style dataset for main.py: ``{"image": HxWx3 in [-1, 1], "caption": str}``.

    ``size`` items per epoch; the index is offset by the epoch (``set_epoch``) so that every epoch sees new
    scenes while any (epoch, index) is reproducible.
    """

    def __init__(self, size: int = 100_000, seed: int = 0, image_key: str = "image", caption_key: str = "caption",
                 **world_kwargs):
        self.world = ToyWorld(seed=seed, **world_kwargs)
        self.size, self.epoch = size, 0
        self.image_key, self.caption_key = image_key, caption_key

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        import torch

        image, caption, _ = self.world.sample(self.epoch * self.size + index)
        pixels = torch.from_numpy(image.astype(np.float32) / 127.5 - 1.0)
        return {self.image_key: pixels, self.caption_key: caption}


# ----- concepts --------------------------------------------------------------------------------------------
def concept_scene(name: str, rng: random.Random, background: str) -> ToyScene:
    if name not in CONCEPTS:
        raise ValueError(f"unknown toy concept '{name}'; known: {', '.join(CONCEPTS)}")
    shape = CONCEPTS[name]["superclass"]
    r = rng.uniform(8.0, 10.5)
    return ToyScene(background, [ToyObject(shape, "none", SIZE / 2 + rng.uniform(-4, 4),
                                           SIZE / 2 + rng.uniform(-4, 4), r, pattern=name)])


# Concept masks spill over the object as ClipSeg's do: full weight on it, SPILL_WEIGHT on a band SPILL_PX wide
# around it. With the exact coverage alone the loss never sees the pixels between a star's points, and trainings
# drew the concept's colour as a disc (ckpt/toy/README.md, "Masks that spill").
SPILL_PX, SPILL_WEIGHT = 3, 0.6


def concept_mask(coverage: np.ndarray) -> Image.Image:
    """Soft training mask (8-bit) of one object's exact coverage (H x W in [0, 1]): the coverage blurred by 0.7 px,
    and at least SPILL_WEIGHT within SPILL_PX pixels of it."""
    soft = Image.fromarray((coverage * 255).round().astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.7))
    band = soft.filter(ImageFilter.MaxFilter(2 * SPILL_PX + 1))
    mask = np.maximum(np.asarray(soft, np.float64), SPILL_WEIGHT * np.asarray(band, np.float64))
    return Image.fromarray(np.clip(mask, 0, 255).round().astype(np.uint8))


def write_concept(name: str, folder: str | Path, n: int = 6, seed: int = 0) -> list[Path]:
    """``n`` training images of a toy concept (black and white backgrounds, varied places and sizes) and soft
    masks in ``mask/`` (``concept_mask``: the coverage spilling over the object, as ClipSeg's masks do)."""
    folder = Path(folder)
    (folder / "mask").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{name}-{seed}")
    paths = []
    for i in range(n):
        scene = concept_scene(name, rng, list(BACKGROUNDS)[i % len(BACKGROUNDS)])
        image, masks = render(scene)
        path = folder / f"{i:02d}.png"
        Image.fromarray(image).save(path)
        concept_mask(masks[0]).save(folder / "mask" / path.name)
        paths.append(path)
    return paths


# ----- pictures --------------------------------------------------------------------------------------------
def upscale(image: np.ndarray, factor: int = 4) -> Image.Image:
    return Image.fromarray(image).resize((image.shape[1] * factor, image.shape[0] * factor),
                                         Image.Resampling.NEAREST)


def example_sheet(world: ToyWorld, n: int = 16, factor: int = 4) -> Image.Image:
    """Rendered samples with their captions, one per row (to look at the world)."""
    tile = SIZE * factor
    sheet = Image.new("RGB", (tile + 420, n * (tile + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        image, caption, _ = world.sample(i)
        sheet.paste(upscale(image, factor), (0, i * (tile + 4)))
        draw.text((tile + 8, i * (tile + 4) + tile // 2 - 6), caption or "(empty caption)", fill=(0, 0, 0))
    return sheet


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", metavar="DIR", help="write toy_<name>/ training folders of both concepts")
    parser.add_argument("--n", type=int, default=6, help="images per concept")
    parser.add_argument("--sheet", metavar="PNG", help="write a sheet of rendered examples with captions")
    parser.add_argument("--captions", metavar="TXT", help="write the captions for C^-1, one per line")
    parser.add_argument("--n_captions", type=int, default=20000, help="world captions (and as many random-word ones)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (args.concepts or args.sheet or args.captions):
        parser.error("nothing to do: give --concepts DIR, --sheet PNG and/or --captions TXT")
    if args.captions:
        captions = captions_for_c_inv(args.n_captions, seed=args.seed + 1)
        Path(args.captions).write_text("\n".join(captions) + "\n")
        print(f"{len(captions)} captions written to {args.captions}")
    if args.concepts:
        for name in CONCEPTS:
            paths = write_concept(name, Path(args.concepts) / name, n=args.n, seed=args.seed)
            print(f"{name}: {len(paths)} images and masks in {paths[0].parent}")
    if args.sheet:
        example_sheet(ToyWorld(seed=args.seed)).save(args.sheet)
        print(f"sheet written to {args.sheet}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
