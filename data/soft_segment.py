"""Write ClipSeg soft masks of a concept's images for mask-weighted Perfusion training.

    python ./data/soft_segment.py --image_dir /path/to/your/images/ --super_class dog

For every image in --image_dir (jpg/jpeg/png/webp/bmp/tif, any case) this writes image_dir/mask/<same file name>:
an 8-bit grayscale mask (0..255) = mean over super-class prompt templates of sigmoid(ClipSeg logits), at the
image's displayed size (EXIF orientation applied). Mask files always hold PNG data, also under a .jpg/.webp name,
so masks stay lossless and the dataset finds them by the image's own file name (PIL reads them by content).
Existing masks are kept unless --overwrite. A preview sheet (image | mask | overlay per row) goes to
image_dir/mask/_masks_preview.png, where the dataset, which looks masks up by image name, never reads it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # runnable as a standalone script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402
from tqdm import tqdm  # noqa: E402

from clipseg.paths import DEFAULT_DECODER_WEIGHTS, ClipSegWeightsNotFound, check_weights_exist  # noqa: E402
from ldm.util import UserError, atomic_write, one_line_warnings  # noqa: E402
from perfusion.dataset import IMAGE_EXTENSIONS, image_files, load_image  # noqa: E402

MASK_DIR_NAME = "mask"
PREVIEW_NAME = "_masks_preview.png"
PREVIEW_ROW_HEIGHT = 128
PREVIEW_MAX_ROWS = 64
# Averaging several phrasings makes the mask less sensitive to one prompt's quirks.
PROMPT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a {}.",
)


class SoftSegmentError(UserError):
    """A user-facing problem with the inputs; main() prints it and exits with status 2."""


def save_mask(mask: np.ndarray, path: Path) -> None:
    """8-bit grayscale PNG data, written atomically so an interrupted run leaves no half file."""
    atomic_write(path, lambda temporary: Image.fromarray(mask, mode="L").save(temporary, format="PNG"))


def to_uint8(mask) -> np.ndarray:
    return np.clip(np.round(np.asarray(mask, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def preview_path(mask_dir: Path, image_names: set[str]) -> Path:
    name = PREVIEW_NAME
    while name in image_names:  # never shadow the mask of an image that happens to share the name
        name = "_" + name
    return mask_dir / name


def write_preview(pairs: list[tuple[Path, Path]], destination: Path) -> int:
    """One PNG: a row per image with the image, its mask and a red overlay. Returns the number of rows."""
    rows = []
    for image_path, mask_path in pairs[:PREVIEW_MAX_ROWS]:
        image = load_image(image_path)
        with Image.open(mask_path) as opened:
            mask = opened.convert("L")
        width = max(1, round(image.width * PREVIEW_ROW_HEIGHT / image.height))
        size = (width, PREVIEW_ROW_HEIGHT)
        image, mask = image.resize(size, Image.BILINEAR), mask.resize(size, Image.BILINEAR)
        alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0 * 0.6
        red = np.array([255.0, 0.0, 0.0], dtype=np.float32)
        overlay = np.asarray(image, dtype=np.float32) * (1 - alpha) + red * alpha
        row = Image.new("RGB", (3 * width, PREVIEW_ROW_HEIGHT))
        for column, tile in enumerate([image, mask.convert("RGB"), Image.fromarray(overlay.astype(np.uint8))]):
            row.paste(tile, (column * width, 0))
        rows.append(row)
    sheet = Image.new("RGB", (max(r.width for r in rows), PREVIEW_ROW_HEIGHT * len(rows)), (255, 255, 255))
    for index, row in enumerate(rows):
        sheet.paste(row, (0, index * PREVIEW_ROW_HEIGHT))
    atomic_write(destination, lambda temporary: sheet.save(temporary, format="PNG"))
    return len(rows)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_dir", required=True, help="folder with the concept's images")
    parser.add_argument("--super_class", required=True, help="the concept's super-class word, e.g. 'teddy bear'")
    parser.add_argument("--model_weight", default=str(DEFAULT_DECODER_WEIGHTS),
                        help="original ClipSeg rd64-uni-refined.pth, or a transformers ClipSeg folder "
                             "(e.g. a local copy of CIDAS/clipseg-rd64-refined)")
    parser.add_argument("--clip_weight", default=None,
                        help="CLIP ViT-B/16 weights for a decoder-only .pth: OpenAI ViT-B-16.pt, an open_clip/"
                             "OpenAI state dict, or a transformers openai/clip-vit-base-patch16 folder "
                             "(default: ViT-B-16.pt next to the .pth, in ./clipseg/weights/ or ~/.cache/clip/)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--overwrite", action="store_true", help="recompute masks that already exist")
    parser.add_argument("--batch_size", type=int, default=4, help="images per forward pass (each x prompts)")
    parser.add_argument("--image_size", type=int, default=None,
                        help="ClipSeg input size (default: the folder's preprocessor config, else 352)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if not args.super_class.strip():
        parser.error("--super_class must not be empty")
    return args


def run(args: argparse.Namespace) -> dict:
    image_dir = Path(args.image_dir).expanduser()
    if not image_dir.is_dir():
        raise SoftSegmentError(f"--image_dir {image_dir} does not exist or is not a folder.")
    images = image_files(image_dir)
    if not images:
        raise SoftSegmentError(
            f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}, any case) directly in --image_dir {image_dir}.")
    mask_dir = image_dir / MASK_DIR_NAME
    mask_dir.mkdir(exist_ok=True)
    todo = [path for path in images if args.overwrite or not (mask_dir / path.name).is_file()]
    for path in todo:  # fail before loading the model if a file is not an image at all
        try:
            with Image.open(path):
                pass
        except (OSError, UnidentifiedImageError) as error:
            raise SoftSegmentError(f"cannot read image {path}: {error}") from error

    if todo:
        check_weights_exist(args.model_weight)
        import torch

        from clipseg.model import load_clipseg

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            masker = load_clipseg(args.model_weight, clip_path=args.clip_weight, device=device,
                                  image_size=args.image_size)
        except ValueError as error:  # unreadable/unsupported weight files: name them instead of a traceback
            raise SoftSegmentError(f"cannot load ClipSeg from --model_weight {args.model_weight}"
                                   f"{f' / --clip_weight {args.clip_weight}' if args.clip_weight else ''}: {error}") from error

        prompts = [template.format(args.super_class.strip()) for template in PROMPT_TEMPLATES]
        with tqdm(total=len(todo), desc="ClipSeg masks", unit="img") as progress:
            for start in range(0, len(todo), args.batch_size):
                batch = todo[start:start + args.batch_size]
                masks = masker.masks([load_image(path) for path in batch], prompts)
                for path, mask in zip(batch, masks):
                    save_mask(to_uint8(mask.numpy()), mask_dir / path.name)
                progress.update(len(batch))

    preview = preview_path(mask_dir, {path.name for path in images})
    if todo or not preview.is_file():
        write_preview([(path, mask_dir / path.name) for path in images], preview)
    return {"written": len(todo), "skipped": len(images) - len(todo), "mask_dir": mask_dir, "preview": preview}


def main(argv=None) -> int:
    args = parse_args(argv)
    one_line_warnings()
    try:
        summary = run(args)
    except (UserError, ClipSegWeightsNotFound) as error:
        print(f"soft_segment.py: error: {error}", file=sys.stderr)
        return 2
    print(f"Masks written: {summary['written']}, skipped (already present, use --overwrite to redo): "
          f"{summary['skipped']}, in {summary['mask_dir']}")
    print(f"Preview: {summary['preview']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
