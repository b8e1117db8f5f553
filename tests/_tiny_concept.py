"""Test helpers for the tiny random-weight models: teddy-like concept images with soft masks, generic captions,
and the C^-1 of a tiny text encoder. Everything is generated from seeds; nothing is downloaded."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SUBJECTS = ["teddy", "cat", "dog", "car", "house", "tree", "person", "bird", "flower", "chair", "cup", "boat"]
STYLES = ["a photo of", "a painting of", "a drawing of", "a close-up of", "a picture of", "a rendering of"]
PLACES = ["on the beach", "in a forest", "in the snow", "on a table", "in the city", "at night", "in a garden",
          "under the sea", "on the moon", "in a kitchen", ""]
ADJECTIVES = ["red", "small", "big", "old", "shiny", "fluffy", "wooden", "blue", "happy", "dirty", "green", ""]


def toy_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    captions = []
    for _ in range(n):
        words = [rng.choice(STYLES), "a", rng.choice(ADJECTIVES), rng.choice(SUBJECTS), rng.choice(PLACES)]
        captions.append(" ".join(w for w in words if w))
    return captions


def write_toy_concept_images(folder: str | Path, n: int = 4, size: int = 64, seed: int = 0) -> list[Path]:
    """A 'teddy': a brown body with two ears at varying places and scales on varied backgrounds, plus
    ``mask/<same name>`` soft masks (blurred silhouettes), as soft_segment.py would write them."""
    folder = Path(folder)
    (folder / "mask").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        background = tuple(int(v) for v in rng.integers(40, 220, size=3))
        image = Image.new("RGB", (size, size), background)
        mask = Image.new("L", (size, size), 0)
        radius = size * rng.uniform(0.18, 0.28)
        cx, cy = size * rng.uniform(0.35, 0.65), size * rng.uniform(0.4, 0.65)
        shapes = [(cx, cy, radius), (cx - 0.8 * radius, cy - 0.9 * radius, 0.4 * radius),
                  (cx + 0.8 * radius, cy - 0.9 * radius, 0.4 * radius)]
        for target, fill in ((ImageDraw.Draw(image), (120, 75, 35)), (ImageDraw.Draw(mask), 255)):
            for x, y, r in shapes:
                target.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        ImageDraw.Draw(image).ellipse([cx - 0.2 * radius, cy - 0.1 * radius, cx + 0.2 * radius, cy + 0.2 * radius],
                                      fill=(20, 10, 5))
        path = folder / f"{i:02d}.png"
        image.save(path)
        mask.filter(ImageFilter.GaussianBlur(size / 32)).save(folder / "mask" / path.name)
        paths.append(path)
    return paths


def write_toy_c_inv(encoder, path: str | Path, n_captions: int = 300, seed: int = 0) -> Path:
    """C^-1 of ``encoder`` over toy captions (real tokens only), saved like data/estimate_C_inv.py does."""
    from perfusion.covariance import accumulate_second_moment, invert_covariance, save_c_inv

    second_moment, n_tokens = accumulate_second_moment(encoder, toy_captions(n_captions, seed), batch_size=100)
    c_inv, condition = invert_covariance(second_moment, n_tokens, eps=1e-6)
    return save_c_inv(path, c_inv, {"encoder": type(encoder).__name__, "n_tokens": n_tokens, "eps": 1e-6})
