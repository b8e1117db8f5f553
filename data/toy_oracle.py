"""The toy world's oracle: reads background, objects (colour, shape, place) and toy-concept patterns from an image.

Measured rules, no learning: every pixel takes the nearest colour of the world's palette; the background is the
black/white majority on the border; objects are connected regions of object colours; an object's shape is the
template (circle, square, triangle, star) that best overlaps it once stretched over its bounding box; a concept's
pattern is a test on the colours inside a star-like or square-like object (``toy_star``: mostly orange, a colour the
world never shows; ``toy_dots``: a blue square with yellow spots in at least three of its quadrants).

``python data/toy_oracle.py --validate`` scores the oracle on freshly rendered scenes (seed never used in
training); ``python data/toy_oracle.py image.png ... --prompt "..."`` reads images and checks them against prompts.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.toy_world import (BACKGROUNDS, COLOURS, CONCEPT_COLOURS, CONCEPTS, SHAPES, SIZE, ToyWorld,  # noqa: E402
                            concept_scene, render, shape_polygon)

PALETTE_NAMES = list(COLOURS) + list(BACKGROUNDS) + list(CONCEPT_COLOURS)
PALETTE = np.array([{**COLOURS, **BACKGROUNDS, **CONCEPT_COLOURS}[n] for n in PALETTE_NAMES], dtype=np.float32)
OBJECT_LABELS = {PALETTE_NAMES.index(n) for n in (*COLOURS, *CONCEPT_COLOURS)}
MIN_OBJECT_AREA = 8  # pixels; smaller specks are noise


@dataclass
class ObjectReading:
    colour: str
    shape: str
    shape_score: float  # overlap (IoU) with the best template
    area: int
    cx: float
    cy: float
    colour_fractions: dict[str, float] = field(default_factory=dict)
    pattern: str | None = None


@dataclass
class Reading:
    background: str | None
    objects: list[ObjectReading]  # largest first

    def summary(self) -> str:
        objects = ", ".join(f"{o.colour} {o.shape}" + (f" [{o.pattern}]" if o.pattern else "") for o in self.objects)
        return f"{self.background or '?'} background: {objects or 'no object'}"


# ----- pixels ------------------------------------------------------------------------------------------------
def palette_labels(image: np.ndarray) -> np.ndarray:
    """(H, W) index into PALETTE_NAMES of each pixel's nearest palette colour."""
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    distances = ((pixels[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1)
    return distances.argmin(-1)


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected regions of a boolean mask, as lists of (y, x) coordinates."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    regions = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, region = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        regions.append(np.array(region))
    return regions


# ----- shapes ------------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _template(shape: str, width: int, height: int) -> np.ndarray:
    """Boolean (height, width) silhouette of ``shape`` stretched to fill the box (drawn at 4x, box-filtered)."""
    scale, big = 4, 256
    polygon = shape_polygon(shape, big / 2, big / 2, big / 2)
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    if polygon is None:
        draw.ellipse([0, 0, big, big], fill=255)
    else:
        draw.polygon(polygon, fill=255)
    box = canvas.getbbox()
    stretched = canvas.crop(box).resize((width * scale, height * scale), Image.Resampling.BOX)
    return np.asarray(stretched.resize((width, height), Image.Resampling.BOX)) >= 128


def shape_scores(region_mask: np.ndarray) -> dict[str, float]:
    """Overlap (IoU) of a boolean mask, cropped to its bounding box, with each shape template stretched over it."""
    height, width = region_mask.shape
    scores = {}
    for shape in SHAPES:
        template = _template(shape, width, height)
        union = np.logical_or(template, region_mask).sum()
        scores[shape] = float(np.logical_and(template, region_mask).sum() / max(union, 1))
    return scores


# ----- concept patterns --------------------------------------------------------------------------------------
PATTERN_MIN_OVERLAP = 0.4  # a concept's pattern counts on an object that overlaps its super-class shape this much


def find_pattern(scores: dict[str, float], labels: np.ndarray, region: np.ndarray) -> str | None:
    """Which toy concept an object shows, if any. toy_star: read as a star (its best template; an orange circle
    or triangle is not the concept) and mostly orange, a colour the world never shows. toy_dots: square-like, not
    necessarily classified as a square (the dots distort the outline), blue with yellow in three or four
    quadrants."""
    yellow, blue = PALETTE_NAMES.index("yellow"), PALETTE_NAMES.index("blue")
    orange = PALETTE_NAMES.index("orange")
    values = labels[region[:, 0], region[:, 1]]
    ys, xs = region[:, 0], region[:, 1]
    cy, cx = ys.mean(), xs.mean()
    if max(scores, key=scores.get) == "star" and (values == orange).mean() >= 0.6:
        return "toy_star"
    if scores["square"] >= PATTERN_MIN_OVERLAP:
        yellow_share = (values == yellow).mean()
        if (values == blue).mean() >= 0.5 and 0.03 <= yellow_share <= 0.4:
            is_yellow = values == yellow
            quadrants = {(bool(y < cy), bool(x < cx)) for y, x in zip(ys[is_yellow], xs[is_yellow])}
            if len(quadrants) >= 3:
                return "toy_dots"
    return None


# ----- reading an image --------------------------------------------------------------------------------------
def read_image(image) -> Reading:
    """Read an RGB image (array HxWx3 uint8, or a PIL image / path), any size (resized to the world's 32 px)."""
    if isinstance(image, (str, Path)):
        image = Image.open(image)
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (SIZE, SIZE):
            image = image.resize((SIZE, SIZE), Image.Resampling.BOX)
        image = np.asarray(image)
    labels = palette_labels(image)
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    counts = {name: int((border == PALETTE_NAMES.index(name)).sum()) for name in BACKGROUNDS}
    best = max(counts, key=counts.get)
    background = best if counts[best] >= 0.5 * len(border) else None
    foreground = np.isin(labels, list(OBJECT_LABELS))
    objects = []
    for region in connected_components(foreground):
        if len(region) < MIN_OBJECT_AREA:
            continue
        ys, xs = region[:, 0], region[:, 1]
        crop = np.zeros((ys.max() - ys.min() + 1, xs.max() - xs.min() + 1), dtype=bool)
        crop[ys - ys.min(), xs - xs.min()] = True
        scores = shape_scores(crop)
        shape = max(scores, key=scores.get)
        values = labels[ys, xs]
        fractions = {name: float((values == PALETTE_NAMES.index(name)).mean()) for name in (*COLOURS, *CONCEPT_COLOURS)
                     if (values == PALETTE_NAMES.index(name)).any()}
        colour = max(fractions, key=fractions.get)
        objects.append(ObjectReading(colour, shape, scores[shape], len(region), float(xs.mean()), float(ys.mean()),
                                     fractions, find_pattern(scores, labels, region)))
    objects.sort(key=lambda o: -o.area)
    return Reading(background, objects)


# ----- prompts -----------------------------------------------------------------------------------------------
_OBJECT = re.compile(r"\ba (?:(%s) )?(%s)\b" % ("|".join(COLOURS), "|".join(SHAPES)))
_BACKGROUND = re.compile(r"on a (%s) background" % "|".join(BACKGROUNDS))


@dataclass
class PromptSpec:
    objects: list[tuple[str | None, str]]  # (colour or None, shape)
    background: str | None


def parse_prompt(prompt: str) -> PromptSpec:
    """What a toy-world prompt asks for: 'a red star and a circle on a white background'."""
    background = _BACKGROUND.search(prompt)
    return PromptSpec([(m.group(1), m.group(2)) for m in _OBJECT.finditer(prompt)],
                      background.group(1) if background else None)


def check(reading: Reading, prompt: str) -> dict[str, bool]:
    """Which requested attributes the image shows.

    One object: ``colour``, ``shape``, ``background``, ``all`` (for the largest object). Two objects: ``count``
    (exactly two objects), ``both`` (the two largest objects are the requested (colour, shape) pairs, bound
    correctly), ``background``, ``all``. Attributes the prompt leaves open are not judged.
    """
    spec = parse_prompt(prompt)
    result: dict[str, bool] = {}
    if spec.background:
        result["background"] = reading.background == spec.background
    if len(spec.objects) == 1:
        colour, shape = spec.objects[0]
        largest = reading.objects[0] if reading.objects else None
        result["shape"] = largest is not None and largest.shape == shape
        if colour:
            result["colour"] = largest is not None and largest.colour == colour
    elif len(spec.objects) == 2:
        found = [(o.colour, o.shape) for o in reading.objects[:2]]
        first, second = spec.objects

        def matches(seen, wanted):
            return seen[1] == wanted[1] and (wanted[0] is None or seen[0] == wanted[0])

        result["count"] = len(reading.objects) == 2
        result["both"] = len(found) == 2 and any(matches(found[0], a) and matches(found[1], b)
                                                 for a, b in ((first, second), (second, first)))
    result["all"] = all(result.values())
    return result


def concept_found(reading: Reading, concept: str) -> bool:
    return any(o.pattern == concept for o in reading.objects)


# ----- validation on rendered scenes -------------------------------------------------------------------------
def validate(n: int = 400, seed: int = 987_654) -> dict[str, float]:
    """Accuracy of the oracle on rendered scenes of a seed never used for training (full captions only), and
    the concept detector's hit rate on rendered concepts and false-alarm rate on plain scenes."""
    import random

    world = ToyWorld(seed=seed, short_caption_p=0.0, caption_dropout=0.0, photo_prefix_p=0.0, hold_out=())
    totals: dict[str, list[bool]] = {}
    false_alarms = 0
    for i in range(n):
        scene, caption = world.scene(i)
        image, _ = render(scene)
        reading = read_image(image)
        kind = "one" if len(scene.objects) == 1 else "two"
        for key, ok in check(reading, caption).items():
            totals.setdefault(f"{kind}/{key}", []).append(ok)
        false_alarms += any(o.pattern for o in reading.objects)
    rng = random.Random(seed)
    for name in CONCEPTS:
        hits = [concept_found(read_image(render(concept_scene(name, rng, rng.choice(list(BACKGROUNDS))))[0]), name)
                for _ in range(n // 4)]
        totals[f"concept/{name}"] = hits
    scores = {key: float(np.mean(values)) for key, values in sorted(totals.items())}
    scores["concept/false_alarm"] = false_alarms / n
    return scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="images to read")
    parser.add_argument("--prompt", help="check the images against this prompt")
    parser.add_argument("--validate", action="store_true", help="score the oracle on rendered scenes")
    parser.add_argument("--n", type=int, default=400, help="scenes for --validate")
    args = parser.parse_args(argv)
    if args.validate:
        for key, value in validate(args.n).items():
            print(f"{key:24s} {100 * value:6.1f} %")
    for path in args.images:
        reading = read_image(path)
        line = f"{path}: {reading.summary()}"
        if args.prompt:
            line += f"  {check(reading, args.prompt)}"
        print(line)
    if not args.validate and not args.images:
        parser.error("give images to read or --validate")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
