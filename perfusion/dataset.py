"""The masked concept dataset for Perfusion training.

A concept folder holds a few images of the concept and, in ``mask/``, one soft mask per image under the same
file name (written by ``python data/soft_segment.py --image_dir <dir> --super_class <word>``). Each item is a
square crop of one image with the same crop/flip applied to its mask, plus a caption with the placeholder token
and the same caption with the super-class word (used to lock the keys, see docs/method.md, section 3).

Masks are expected in the image's *displayed* orientation (after EXIF transpose), which is how soft_segment.py
writes them. Two tolerated deviations, each reported once by a warning at construction:
- a mask at the image's *stored* size of an EXIF-rotated image (made from the raw pixels) gets the image's
  EXIF orientation applied, so it lines up with the displayed image;
- a mask of any other size is resized (bilinear) to the displayed image size.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ldm.util import BadValueError, MissingFileError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})

# ImageNet-style object prompts; "{}" is the concept word (placeholder token or super-class word).
DEFAULT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
)

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

_SETS = ("train", "val", "validation", "test")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientations 5..8 swap width and height; this is the transpose that displays the stored pixels upright.
_SWAPPING_ORIENTATIONS = {
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_MAKE_MASKS_HINT = "python data/soft_segment.py --image_dir {root} --super_class <word>"


def image_files(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder`` (extension case-insensitive), sorted; subfolders and hidden files are
    skipped."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def list_images(data_root: str | Path) -> list[Path]:
    """Image files directly in ``data_root`` (extension case-insensitive), sorted; subfolders and hidden
    files are skipped. Raises FileNotFoundError/ValueError with the fix when there are none."""
    root = Path(data_root).expanduser()
    expected = (
        f"Expected a folder of concept images (jpg/jpeg/png/webp/bmp/tif) with a mask/ subfolder holding one "
        f"mask per image under the same file name, made by `{_MAKE_MASKS_HINT.format(root=root)}`."
    )
    if not root.exists():
        raise MissingFileError(f"data_root {str(root)!r} does not exist. {expected}")
    if not root.is_dir():
        raise MissingFileError(f"data_root {str(root)!r} is a file, not a folder. {expected}")
    images = image_files(root)
    if not images:
        files = [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
        others = f" (it holds {len(files)} other file(s), e.g. {files[0].name!r})" if files else ""
        raise BadValueError(f"data_root {str(root)!r} holds no images{others}. {expected}")
    return images


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode ``path``, turning any decoder failure into an error that names the file."""
    try:
        with Image.open(path) as image:
            image.load()  # pixels now live in memory; the file can close
            return image
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise BadValueError(
            f"cannot read {what} {str(path)!r}: {error}. Re-save it as PNG or JPEG, or remove it."
        ) from error


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except (TypeError, ValueError):
        return 1


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL mode: transparency composited on white, 16/32-bit integer gray scaled (not
    clipped) to 8 bits, float gray taken as 0..1 when its maximum is <= 1, else 0..255."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        # 16-bit gray (PNG) spans 0..65535; a plain convert("L") would clip everything above 255 to white.
        values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257.0
        return Image.fromarray(np.round(values).astype(np.uint8)).convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if values.max(initial=0.0) <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.round(np.clip(values, 0, 255)).astype(np.uint8)).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGB


def load_image(path: str | Path) -> Image.Image:
    """The image as displayed (EXIF orientation applied), in 8-bit RGB."""
    image = _open(Path(path), "image")
    return to_rgb(ImageOps.exif_transpose(image))


def mask_to_array(mask: Image.Image) -> np.ndarray:
    """Soft mask in [0, 1] (float32, H x W), NOT yet normalised by its maximum."""
    mode = mask.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.clip(np.asarray(mask, dtype=np.float64), 0, 65535) / 65535.0
    elif mode == "F":
        values = np.clip(np.asarray(mask, dtype=np.float64), 0, None)
    else:  # gray masks are usually "L"; colour or alpha masks are read by their luminance
        values = np.asarray(mask.convert("L"), dtype=np.float64) / 255.0
    return values.astype(np.float32)


@dataclass(frozen=True)
class _ItemPlan:
    """What validation found out about one image and its mask."""

    image_path: Path
    size: tuple[int, int]  # displayed (width, height)
    mask_path: Path | None
    mask_transpose: Image.Transpose | None  # the image's EXIF transpose, for a mask made from raw pixels
    mask_needs_resize: bool


class PersonalizedBase(Dataset):
    """Images of one concept with their soft masks, for Perfusion training.

    Items: ``{"jpg": float32 (size, size, 3) in [-1, 1], "mask": float32 (size, size) in [0, 1],
    "caption": str, "caption_superclass": str, "path": str, "latent_key": str}``. ``len`` is the number of images;
    training length is set by the trainer's ``max_steps``, so ``repeats`` (old configs) is ignored.

    ``latent_key`` names the exact pixels of a deterministic crop (image, box, size, flip), so that the model can
    encode each such crop once (``cache_latents``); it is empty for a random crop, which is never cached.

    Randomness (crop position when ``center_crop=False``, flip, template choice) draws from torch's global RNG:
    main.py seeds it with ``seed_everything(seed, workers=True)``, which also seeds every DataLoader worker (from
    the loader's base seed), so runs are reproducible and each epoch draws new augmentations.
    """

    # Keys of the Textual Inversion / reference Perfusion data configs that this dataset does not use.
    UNUSED_CONFIG_KEYS = {
        "per_image_tokens": "Perfusion learns one word per concept, not one per image",
        "mixing_prob": "captions name one concept; mix concepts at inference with {1}/{2}",
        "coarse_class_text": "the super-class word comes from initializer_words (or superclass:)",
        "seed": "augmentations draw from torch's RNG, seeded by main.py --seed (seed_everything)",
    }

    def __init__(
        self,
        data_root: str | Path,
        size: int = 512,
        flip_p: float = 0.5,
        placeholder_token: str = "*",
        superclass: str = "object",
        templates: Sequence[str] | None = None,
        use_masks: bool = True,
        mask_dir: str | Path = "mask",
        interpolation: str = "bicubic",
        center_crop: bool = True,
        set: str = "train",  # noqa: A002 - the name old configs use
        repeats: int | None = None,
    ):
        self.data_root = Path(data_root).expanduser()
        self.size = self._check_size(size)
        self.flip_p = self._check_probability(flip_p)
        self.placeholder_token = self._check_word(placeholder_token, "placeholder_token")
        self.superclass = self._check_word(superclass, "superclass")
        self.templates = self._check_templates(DEFAULT_TEMPLATES if templates is None else templates)
        self.use_masks = bool(use_masks)
        self.interpolation = self._check_interpolation(interpolation)
        self.center_crop = bool(center_crop)
        if set not in _SETS:
            raise BadValueError(f"PersonalizedBase: set={set!r}; use one of {list(_SETS)}")
        # Evaluation sets are deterministic: centre crop, no flip.
        self.is_train = set == "train"
        if repeats is not None:
            warnings.warn(
                f"PersonalizedBase: repeats={repeats} is ignored. len(dataset) is the number of images "
                f"({self.data_root}); training length is set by the trainer's max_steps (optimizer steps).",
                UserWarning,
                stacklevel=2,
            )

        mask_root = Path(mask_dir).expanduser()
        self.mask_dir = mask_root if mask_root.is_absolute() else self.data_root / mask_root
        self.image_paths = list_images(self.data_root)
        self._plans = [self._validate(path) for path in self.image_paths]
        self._warn_about_plans()

    # ----- argument checks -------------------------------------------------------------------------------
    @staticmethod
    def _check_size(size) -> int:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
            raise BadValueError(f"PersonalizedBase: size must be a positive integer (pixels), got {size!r}")
        return int(size)

    @staticmethod
    def _check_probability(flip_p) -> float:
        flip_p = float(flip_p)
        if not 0.0 <= flip_p <= 1.0:
            raise BadValueError(f"PersonalizedBase: flip_p must be in [0, 1], got {flip_p}")
        return flip_p

    @staticmethod
    def _check_word(word, name: str) -> str:
        if not isinstance(word, str) or not word.strip():
            raise BadValueError(f"PersonalizedBase: {name} must be a non-empty string, got {word!r}")
        return word.strip()

    @staticmethod
    def _check_templates(templates: Sequence[str]) -> tuple[str, ...]:
        if isinstance(templates, str) or len(templates) == 0:
            raise BadValueError("PersonalizedBase: templates must be a non-empty list of strings with one '{}' each")
        for template in templates:
            # Exactly one slot: the concept's token position is found by tokenising the caption.
            if not isinstance(template, str) or template.count("{}") != 1:
                raise BadValueError(f"PersonalizedBase: template {template!r} must contain '{{}}' exactly once")
        return tuple(templates)

    @staticmethod
    def _check_interpolation(interpolation: str) -> Image.Resampling:
        key = str(interpolation).lower()
        if key not in _RESAMPLING:
            raise BadValueError(
                f"PersonalizedBase: interpolation={interpolation!r}; use one of {sorted(_RESAMPLING)}"
            )
        return _RESAMPLING[key]

    # ----- validation ------------------------------------------------------------------------------------
    def _find_mask(self, image_path: Path) -> Path:
        candidates = [self.mask_dir / image_path.name, self.mask_dir / f"{image_path.stem}.png"]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise MissingFileError(
            f"no mask for image {str(image_path)!r}: expected {str(candidates[0])!r} (or {candidates[1].name!r} "
            f"there). Fix: make the masks with `{_MAKE_MASKS_HINT.format(root=self.data_root)}`, or set "
            f"`use_masks: false` in the data params to train with uniform loss weights."
        )

    def _validate(self, image_path: Path) -> _ItemPlan:
        """Decode the image (and mask) once so that bad files fail before training starts."""
        raw = _open(image_path, "image")
        displayed = ImageOps.exif_transpose(raw)
        to_rgb(displayed)  # decoding problems of exotic modes surface here, not mid-training
        if not self.use_masks:
            return _ItemPlan(image_path, displayed.size, None, None, False)

        mask_path = self._find_mask(image_path)
        mask = ImageOps.exif_transpose(_open(mask_path, "mask"))
        self._normalised_mask(mask, mask_path)  # raises on an empty mask
        transpose = None
        orientation = _exif_orientation(raw)
        if mask.size != displayed.size and mask.size == raw.size and orientation in _SWAPPING_ORIENTATIONS:
            transpose = _SWAPPING_ORIENTATIONS[orientation]
        oriented_size = mask.size[::-1] if transpose is not None else mask.size
        return _ItemPlan(image_path, displayed.size, mask_path, transpose, oriented_size != displayed.size)

    def _warn_about_plans(self) -> None:
        rotated = [p.mask_path.name for p in self._plans if p.mask_transpose is not None]
        if rotated:
            warnings.warn(
                f"PersonalizedBase: masks {rotated} match the stored (not the EXIF-rotated) size of their images; "
                f"applying the images' EXIF orientation to them. Re-run soft_segment.py to silence this.",
                UserWarning,
                stacklevel=3,
            )
        resized = [
            f"{p.mask_path.name} -> {p.size[0]}x{p.size[1]}" for p in self._plans if p.mask_needs_resize
        ]
        if resized:
            warnings.warn(
                f"PersonalizedBase: resizing masks to their images' displayed sizes: {resized}. "
                f"Masks should have the image's size; re-run soft_segment.py to silence this.",
                UserWarning,
                stacklevel=3,
            )
        small = [p.image_path.name for p in self._plans if min(p.size) < self.size]
        if small:
            warnings.warn(
                f"PersonalizedBase: images {small} are smaller than size={self.size} and will be upscaled.",
                UserWarning,
                stacklevel=3,
            )
        # The square crop keeps min(w, h)^2 of w * h pixels.
        cropped = [f"{p.image_path} keeps {100 * min(p.size) / max(p.size):.0f} % ({p.size[0]}x{p.size[1]})"
                   for p in self._plans if min(p.size) / max(p.size) < 0.5]
        if cropped:
            warnings.warn(
                f"PersonalizedBase: the square crop discards more than half of {len(cropped)} image(s): "
                f"{'; '.join(cropped)}. Crop them to about square around the concept to keep what matters.",
                UserWarning,
                stacklevel=3,
            )

    @staticmethod
    def _normalised_mask(mask: Image.Image, mask_path: Path) -> np.ndarray:
        values = mask_to_array(mask)
        if not np.isfinite(values).all():
            raise BadValueError(f"mask {str(mask_path)!r} holds NaN/inf values; re-make it with soft_segment.py")
        peak = float(values.max(initial=0.0))
        if peak <= 0.0:
            raise BadValueError(
                f"mask {str(mask_path)!r} is empty (all pixels 0), so its image would contribute no loss. "
                f"Re-make it with soft_segment.py (perhaps another --super_class), paint it by hand, or remove "
                f"the image and its mask."
            )
        return values / peak  # soft weights, peak 1

    def _load_mask(self, plan: _ItemPlan) -> Image.Image:
        mask = ImageOps.exif_transpose(_open(plan.mask_path, "mask"))
        values = self._normalised_mask(mask, plan.mask_path)
        mask = Image.fromarray(values)  # float32 -> mode "F", keeps soft values through resizing
        if plan.mask_transpose is not None:
            mask = mask.transpose(plan.mask_transpose)
        if mask.size != plan.size:
            mask = mask.resize(plan.size, Image.Resampling.BILINEAR)
        return mask

    # ----- items -----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"PersonalizedBase index {index} out of range for {len(self)} images")
        index %= len(self)
        plan = self._plans[index]
        image = load_image(plan.image_path)
        mask = self._load_mask(plan) if self.use_masks else None

        template = self.templates[int(torch.randint(len(self.templates), (1,)))]
        width, height = image.size
        side = min(width, height)
        if self.center_crop or not self.is_train:
            left, top = (width - side) // 2, (height - side) // 2
        else:
            left = int(torch.randint(width - side + 1, (1,)))
            top = int(torch.randint(height - side + 1, (1,)))
        flip = bool(torch.rand(()) < self.flip_p) and self.is_train

        box = (left, top, left + side, top + side)
        deterministic_crop = self.center_crop or not self.is_train
        latent_key = f"{plan.image_path}|{box}|{self.size}|{'flip' if flip else ''}" if deterministic_crop else ""
        target = (self.size, self.size)
        # float64 first: in float32, x / 127.5 - 1 loses ~1e-5 relative accuracy near mid gray.
        pixels = np.asarray(image.resize(target, self.interpolation, box=box), dtype=np.float64)
        pixels = (pixels / 127.5 - 1.0).astype(np.float32)
        if mask is not None:
            weights = np.clip(np.asarray(mask.resize(target, Image.Resampling.BILINEAR, box=box)), 0.0, 1.0)
        else:
            weights = np.ones(target, dtype=np.float32)
        if flip:
            pixels, weights = pixels[:, ::-1], weights[:, ::-1]

        return {
            "jpg": torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)),
            "mask": torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)),
            "caption": template.replace("{}", self.placeholder_token),
            "caption_superclass": template.replace("{}", self.superclass),
            "path": str(plan.image_path),
            "latent_key": latent_key,
        }
