"""data/soft_segment.py run as a subprocess with a tiny transformers ClipSeg folder on odd images."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from clipseg.model import load_clipseg
from tests._tiny_clipseg import save_tiny_clipseg_folder, tiny_clipseg_model

torch.set_num_threads(2)
REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "data" / "soft_segment.py"
SUPER_CLASS = "teddy bear"


def _load_script_module():
    spec = importlib.util.spec_from_file_location("soft_segment_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "PYTHONPATH": ""}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd or REPO_ROOT, timeout=300)


def _gradient(width, height, channels=3):
    y, x = np.mgrid[0:height, 0:width]
    planes = [(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)), ((x + y) * 7 % 256)]
    return np.stack(planes[:channels], axis=-1).astype(np.uint8)


def _make_images(folder: Path) -> dict[str, tuple[int, int]]:
    """Writes the odd images; returns file name -> displayed (width, height)."""
    Image.fromarray(_gradient(50, 40)).save(folder / "photo.JPG", quality=95)
    rgba = np.concatenate([_gradient(36, 28), np.full((28, 36, 1), 255, np.uint8)], axis=-1)
    rgba[:, :12, 3] = 0  # transparent strip: must become white, not black
    Image.fromarray(rgba, "RGBA").save(folder / "cutout.png")
    Image.fromarray(_gradient(31, 23)[..., 0], "L").save(folder / "gray.png")
    stored = Image.fromarray(_gradient(40, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    stored.save(folder / "rotated.jpg", exif=exif, quality=95)
    deep = (_gradient(20, 20)[..., 0].astype(np.uint16) * 257)
    Image.fromarray(deep).save(folder / "deep16.png")  # 16-bit grayscale
    Image.fromarray(_gradient(24, 24)).convert("P", palette=Image.ADAPTIVE, colors=16).save(folder / "palette.BMP")
    Image.fromarray(_gradient(20, 26)).convert("CMYK").save(folder / "print.jpeg")
    (folder / "notes.txt").write_text("not an image")
    (folder / "extra").mkdir()
    Image.fromarray(_gradient(8, 8)).save(folder / "extra" / "ignored.png")
    return {"photo.JPG": (50, 40), "cutout.png": (36, 28), "gray.png": (31, 23), "rotated.jpg": (30, 40),
            "deep16.png": (20, 20), "palette.BMP": (24, 24), "print.jpeg": (20, 26)}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_clipseg_folder(tiny_clipseg_model(), tmp_path_factory.mktemp("model") / "clipseg-tiny",
                                    image_size=64)


def _snapshot(mask_dir: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(mask_dir.iterdir())}


def test_soft_segment_writes_skips_and_overwrites(tiny_folder, tmp_path):
    image_dir = tmp_path / "concept"
    image_dir.mkdir()
    displayed = _make_images(image_dir)
    (image_dir / "mask").mkdir()  # an existing (empty) mask folder is fine

    first = _run("--image_dir", image_dir, "--super_class", SUPER_CLASS, "--model_weight", tiny_folder,
                 "--device", "cpu", "--batch_size", 3)
    assert first.returncode == 0, first.stderr
    assert f"Masks written: {len(displayed)}" in first.stdout
    mask_dir = image_dir / "mask"
    masks = {}
    for name, size in displayed.items():
        with Image.open(mask_dir / name) as mask:
            assert mask.format == "PNG" and mask.mode == "L", name
            assert mask.size == size, (name, mask.size, size)
            masks[name] = np.asarray(mask)
        assert masks[name].dtype == np.uint8 and masks[name].min() >= 0 and masks[name].max() <= 255
    assert not (mask_dir / "ignored.png").exists() and not (mask_dir / "notes.txt").exists()
    assert masks["photo.JPG"].std() > 0.5  # a spatial map, not a constant

    # Same numbers as the masker applied in-process to the images as displayed (rotation, white background,
    # 16-bit rescale), so the masks line up with what a viewer and the dataset see.
    script = _load_script_module()
    prompts = [template.format(SUPER_CLASS) for template in script.PROMPT_TEMPLATES]
    with Image.open(image_dir / "rotated.jpg") as stored:
        rotated = ImageOps.exif_transpose(stored).convert("RGB")
    rgba = Image.open(image_dir / "cutout.png")
    composited = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    deep = np.asarray(Image.open(image_dir / "deep16.png"), dtype=np.float64)
    deep8 = Image.fromarray(np.round(deep / 65535 * 255).astype(np.uint8), "L").convert("RGB")
    expected = load_clipseg(tiny_folder).masks([rotated, composited, deep8], prompts)
    for name, soft in zip(["rotated.jpg", "cutout.png", "deep16.png"], expected):
        reference = np.round(soft.numpy() * 255).astype(np.int32)
        assert np.abs(masks[name].astype(np.int32) - reference).max() <= 1, name

    preview = mask_dir / "_masks_preview.png"
    assert preview.is_file() and str(preview) in first.stdout
    with Image.open(preview) as sheet:
        assert sheet.format == "PNG" and sheet.height == 128 * len(displayed)

    before = _snapshot(mask_dir)
    second = _run("--image_dir", image_dir, "--super_class", SUPER_CLASS, "--model_weight", tiny_folder,
                  "--device", "cpu")
    assert second.returncode == 0, second.stderr
    assert "Masks written: 0" in second.stdout and "skipped (already present" in second.stdout
    assert _snapshot(mask_dir) == before  # same files, same bytes, same modification times

    old = 1_000_000_000
    for path in mask_dir.iterdir():
        os.utime(path, (old, old))
    third = _run("--image_dir", image_dir, "--super_class", SUPER_CLASS, "--model_weight", tiny_folder,
                 "--device", "cpu", "--overwrite", "--batch_size", 3)
    assert third.returncode == 0, third.stderr
    assert f"Masks written: {len(displayed)}" in third.stdout
    after = _snapshot(mask_dir)
    for name in displayed:
        assert after[name][0] != old * 10**9, name  # rewritten
        assert after[name][1] == before[name][1], name  # deterministic: same bytes


def test_soft_segment_clear_errors(tmp_path):
    missing = _run("--image_dir", tmp_path / "nowhere", "--super_class", "dog")
    assert missing.returncode == 2 and "nowhere" in missing.stderr and "does not exist" in missing.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no pictures here")
    no_images = _run("--image_dir", empty, "--super_class", "dog")
    assert no_images.returncode == 2 and "no images" in no_images.stderr

    broken = tmp_path / "broken"
    broken.mkdir()
    Image.fromarray(_gradient(10, 10)).save(broken / "fine.png")
    (broken / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    unreadable = _run("--image_dir", broken, "--super_class", "dog")
    assert unreadable.returncode == 2 and "corrupt.jpg" in unreadable.stderr

    good = tmp_path / "good"
    good.mkdir()
    Image.fromarray(_gradient(10, 10)).save(good / "a.png")
    no_weights = _run("--image_dir", good, "--super_class", "dog", "--model_weight", tmp_path / "w" / "rd64.pth")
    assert no_weights.returncode == 2
    assert "wget https://owncloud.gwdg.de/index.php/s/ioHbRzFx6th32hn/download" in no_weights.stderr
    assert "unzip -d ./clipseg/weights -j ./clipseg/weights.zip" in no_weights.stderr
    assert not (good / "mask" / "a.png").exists()
