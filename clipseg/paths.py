"""Where ClipSeg weights live and what to tell the user when they are missing.

Kept free of torch/transformers imports so scripts can check paths before paying for heavy imports.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WEIGHTS_DIR = REPO_ROOT / "clipseg" / "weights"
DEFAULT_DECODER_WEIGHTS = DEFAULT_WEIGHTS_DIR / "rd64-uni-refined.pth"
CLIP_VIT_B16_FILENAME = "ViT-B-16.pt"
CLIP_VIT_B16_URL = (
    "https://openaipublic.azureedge.net/clip/models/"
    "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt"
)

DOWNLOAD_HELP = f"""\
Option A - the original ClipSeg weights (as in the seed README), run from the repository root:
    wget https://owncloud.gwdg.de/index.php/s/ioHbRzFx6th32hn/download -O ./clipseg/weights.zip
    unzip -d ./clipseg/weights -j ./clipseg/weights.zip
  This gives ./clipseg/weights/rd64-uni-refined.pth, which holds only the ClipSeg decoder. It also needs the
  frozen OpenAI CLIP ViT-B/16 backbone:
    wget {CLIP_VIT_B16_URL} -O ./clipseg/weights/{CLIP_VIT_B16_FILENAME}
  (found automatically there or in ~/.cache/clip/; or pass --clip_weight / clip_path= pointing at that file, a
  transformers openai/clip-vit-base-patch16 folder, or an open_clip ViT-B-16 'openai' state dict).
Option B - one transformers folder, no separate CLIP download:
    hf download CIDAS/clipseg-rd64-refined --local-dir ./clipseg/clipseg-rd64-refined
  (older huggingface_hub: huggingface-cli download ...), then pass --model_weight ./clipseg/clipseg-rd64-refined"""


class ClipSegWeightsNotFound(FileNotFoundError):
    """Raised with download instructions when a ClipSeg or CLIP weight file is missing."""


def missing_weights_message(what: str, path: str | os.PathLike) -> str:
    return f"{what} not found: {path}\n{DOWNLOAD_HELP}"


def check_weights_exist(weights_path_or_dir: str | os.PathLike) -> Path:
    """Return the path if it exists, else raise ClipSegWeightsNotFound naming the downloads."""
    path = Path(weights_path_or_dir).expanduser()
    if not path.exists():
        raise ClipSegWeightsNotFound(missing_weights_message("ClipSeg weights", path))
    return path


def default_clip_candidates(decoder_path: str | os.PathLike) -> list[Path]:
    """Places searched for OpenAI's ViT-B-16.pt when only the decoder .pth is given."""
    decoder_dir = Path(decoder_path).expanduser().resolve().parent
    candidates = [
        decoder_dir / CLIP_VIT_B16_FILENAME,
        DEFAULT_WEIGHTS_DIR / CLIP_VIT_B16_FILENAME,
        Path.home() / ".cache" / "clip" / CLIP_VIT_B16_FILENAME,  # where OpenAI's `clip` package downloads it
    ]
    unique: list[Path] = []
    for candidate in candidates:
        if candidate not in unique:
            unique.append(candidate)
    return unique
