"""The masked concept dataset (perfusion/dataset.py) on small images written into tmp_path."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from perfusion.dataset import DEFAULT_TEMPLATES, PersonalizedBase, image_files, load_image

SIZE = 24
EDGE = SIZE // 3  # columns far enough from a half/half boundary to be unmixed
RED, BLUE, GREEN = (230, 20, 20), (20, 20, 230), (20, 200, 20)


def _save_mask(path: Path, values: np.ndarray) -> None:
    """Masks are PNG data, also under a .jpg name (as data/soft_segment.py writes them)."""
    Image.fromarray(values.astype(np.uint8), mode="L").save(path, format="PNG")


def _halves(width: int, height: int, left, right) -> Image.Image:
    pixels = np.zeros((height, width, len(left)), np.uint8)
    pixels[:, : width // 2] = left
    pixels[:, width // 2 :] = right
    return Image.fromarray(pixels)


def _left_half_mask(width: int, height: int, value: int = 200) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[:, : width // 2] = value
    return mask


def _rotated_jpeg(path: Path) -> Image.Image:
    """A JPEG stored 40x30 with EXIF orientation 6, displayed 30x40: red left half, blue right half."""
    displayed = _halves(30, 40, RED, BLUE)
    stored = displayed.transpose(Image.Transpose.ROTATE_90)  # exif_transpose undoes this with ROTATE_270
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, quality=95, subsampling=0, exif=exif.tobytes())
    return displayed


@pytest.fixture()
def concept(tmp_path) -> Path:
    """One image of each awkward kind, each with a soft mask in mask/."""
    root = tmp_path / "teddy"
    masks = root / "mask"
    masks.mkdir(parents=True)
    rng = np.random.default_rng(0)

    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "photo.jpg", quality=95)
    # Vertical ramp peaking at 128: a soft mask that normalisation must stretch to peak 1, not binarise.
    ramp = np.repeat(np.linspace(0, 128, 40)[:, None], 48, axis=1)
    _save_mask(masks / "photo.png", ramp)  # found through the "<stem>.png" fallback

    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[:, 20:] = (*RED, 255)  # left half fully transparent black -> must become white
    Image.fromarray(rgba, mode="RGBA").save(root / "rgba.png")
    _save_mask(masks / "rgba.png", _left_half_mask(40, 40))

    Image.fromarray(rng.integers(0, 255, (48, 40), dtype=np.uint8), mode="L").save(root / "gray.png")
    _save_mask(masks / "gray.png", _left_half_mask(40, 48))

    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([0, 0, 0, *GREEN] + [0] * (256 * 3 - 6))
    palette.paste(1, (20, 0, 40, 40))
    palette.save(root / "palette.png", transparency=0)  # index 0 (left half) transparent
    _save_mask(masks / "palette.png", _left_half_mask(40, 40))

    Image.fromarray(np.full((40, 40), 0x8080, np.uint16)).save(root / "gray16.png")  # 16-bit mid gray
    _save_mask(masks / "gray16.png", _left_half_mask(40, 40))

    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(root / "cmyk.jpg", quality=95)
    _save_mask(masks / "cmyk.jpg", _left_half_mask(40, 40))

    _rotated_jpeg(root / "rotated.jpg")
    _save_mask(masks / "rotated.jpg", _left_half_mask(30, 40))  # in the displayed orientation

    (root / ".DS_Store").write_bytes(b"\0junk")
    (root / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(masks / "_masks_preview.png")
    return root


NAMES = ["cmyk.jpg", "gray.png", "gray16.png", "palette.png", "photo.jpg", "rgba.png", "rotated.jpg"]


def _item(dataset: PersonalizedBase, name: str) -> dict:
    return dataset[[Path(p).name for p in dataset.image_paths].index(name)]


def test_items_have_shapes_ranges_and_sorted_paths(concept):
    dataset = PersonalizedBase(concept, size=SIZE, superclass="teddy")
    assert len(dataset) == 7
    assert [p.name for p in dataset.image_paths] == NAMES
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["jpg"].shape == (SIZE, SIZE, 3) and item["jpg"].dtype == torch.float32
        assert item["mask"].shape == (SIZE, SIZE) and item["mask"].dtype == torch.float32
        assert -1.0 <= item["jpg"].min() and item["jpg"].max() <= 1.0
        assert 0.0 <= item["mask"].min() and item["mask"].max() <= 1.0
        assert 0.9 < item["mask"].max()  # every mask peaks near 1 after normalisation
        assert Path(item["path"]).name == NAMES[index]
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_odd_image_modes_decode_to_rgb(concept):
    dataset = PersonalizedBase(concept, size=SIZE, flip_p=0.0)
    rgba = _item(dataset, "rgba.png")["jpg"]
    assert (rgba[:, :EDGE] > 0.97).all()  # transparent -> white, not black
    assert (rgba[:, -EDGE:, 0] > 0.7).all() and (rgba[:, -EDGE:, 1:] < -0.7).all()
    palette = _item(dataset, "palette.png")["jpg"]
    assert (palette[:, :EDGE] > 0.97).all()
    assert (palette[:, -EDGE:, 1] > 0.5).all() and (palette[:, -EDGE:, 0] < -0.7).all()
    # 16-bit 0x8080 is 8-bit 128; clipping instead of scaling would give white (1.0).
    assert torch.allclose(_item(dataset, "gray16.png")["jpg"], torch.full((SIZE, SIZE, 3), 128 / 127.5 - 1))
    gray = _item(dataset, "gray.png")["jpg"]
    assert torch.equal(gray[..., 0], gray[..., 1]) and torch.equal(gray[..., 0], gray[..., 2])
    cmyk = _item(dataset, "cmyk.jpg")["jpg"]  # C=0 M=Y=255 is red
    assert (cmyk[..., 0] > 0.8).all() and (cmyk[..., 1:] < -0.8).all()


@pytest.mark.parametrize("mode, name", [("I;16", "deep.png"), ("I", "deep.tif")])
def test_sixteen_bit_gray_is_scaled_by_257(tmp_path, mode, name):
    """The one image loader (also data/soft_segment.py's): 16-bit values 0..65535 / 257 -> 0..255. A 16-bit PNG
    written by PIL opens as "I;16"; the same values in a 32-bit "I" image (TIFF) are scaled alike, also when they
    happen to stay <= 255."""
    values = np.array([[0, 1, 128, 255], [257, 32768, 0x8080, 65535]], dtype=np.uint16)
    path = tmp_path / name
    image = Image.fromarray(values)
    (image if mode == "I;16" else image.convert("I")).save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == mode
    rgb = load_image(path)
    assert rgb.mode == "RGB" and rgb.size == (4, 2)
    expected = np.round(values / 257.0).astype(np.uint8)
    assert expected.tolist() == [[0, 0, 0, 1], [1, 128, 128, 255]]
    assert np.array_equal(np.asarray(rgb), np.repeat(expected[..., None], 3, axis=-1))
    dark = values[:1]  # 0..255 only: still 16-bit values, not 8-bit ones
    (Image.fromarray(dark) if mode == "I;16" else Image.fromarray(dark).convert("I")).save(path)
    assert np.asarray(load_image(path))[..., 0].tolist() == [[0, 0, 0, 1]]


def test_unreadable_image_error_names_the_file(tmp_path):
    (tmp_path / "b.png").write_bytes(b"not a png")
    (tmp_path / "a.JPG").write_bytes(b"")
    (tmp_path / ".hidden.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in image_files(tmp_path)] == ["a.JPG", "b.png"]
    with pytest.raises(ValueError, match=r"cannot read image '.*b\.png': .*Re-save it as PNG or JPEG"):
        load_image(tmp_path / "b.png")


def test_soft_mask_is_normalised_by_max_not_binarised(concept):
    mask = _item(PersonalizedBase(concept, size=SIZE, flip_p=0.0), "photo.jpg")["mask"]
    assert mask.max() > 0.95 and mask.min() < 0.05  # ramp 0..128 stretched to 0..1
    assert len(torch.unique(mask)) > 10
    rows = mask.mean(dim=1)
    assert (rows[1:] >= rows[:-1] - 1e-6).all()  # still a ramp, top to bottom


def _assert_mask_marks_red_half(item):
    image, mask = item["jpg"], item["mask"]
    inside, outside = mask > 0.9, mask < 0.1
    assert inside.sum() > 0.35 * SIZE * SIZE and outside.sum() > 0.35 * SIZE * SIZE
    assert (image[inside][:, 0] > image[inside][:, 2]).all()  # red under the mask
    assert (image[outside][:, 2] > image[outside][:, 0]).all()  # blue outside
    # Columns 2+ pixels inside the mask's edge hold unmixed red (resampling blurs only near the edge).
    columns_in = (mask > 0.9).all(dim=0)
    core = columns_in.clone()
    for shift in (-2, -1, 1, 2):
        core &= columns_in.roll(shift)
    assert core.sum() >= SIZE // 3
    assert (image[:, core, 0] > 0.5).all() and (image[:, core, 2] < -0.5).all()


def test_exif_rotated_image_and_mask_align(concept):
    with Image.open(concept / "rotated.jpg") as stored:
        assert stored.size == (40, 30)
    dataset = PersonalizedBase(concept, size=SIZE, flip_p=0.0)
    item = _item(dataset, "rotated.jpg")
    _assert_mask_marks_red_half(item)
    assert item["mask"][:, :EDGE].mean() > 0.95 and item["mask"][:, -EDGE:].max() < 0.05  # bright LEFT half

    # A mask made from the raw stored pixels (40x30) gets the image's EXIF orientation applied.
    raw_mask = Image.fromarray(_left_half_mask(30, 40)).transpose(Image.Transpose.ROTATE_90)
    raw_mask.save(concept / "mask" / "rotated.jpg", format="PNG")
    with pytest.warns(UserWarning, match="EXIF orientation"):
        rotated_fixed = PersonalizedBase(concept, size=SIZE, flip_p=0.0)
    assert torch.equal(_item(rotated_fixed, "rotated.jpg")["mask"], item["mask"])


def test_mask_of_other_size_is_resized_with_a_warning(concept):
    _save_mask(concept / "mask" / "rgba.png", _left_half_mask(20, 20, value=255))
    with pytest.warns(UserWarning, match=r"rgba\.png -> 40x40"):
        dataset = PersonalizedBase(concept, size=SIZE, flip_p=0.0)
    mask = _item(dataset, "rgba.png")["mask"]
    assert mask[:, :EDGE].min() > 0.95 and mask[:, -EDGE:].max() < 0.05


def test_flip_mirrors_image_and_mask_together(concept):
    plain = PersonalizedBase(concept, size=SIZE, flip_p=0.0)
    flipped = PersonalizedBase(concept, size=SIZE, flip_p=1.0)
    for index in range(len(plain)):
        torch.manual_seed(index)
        a = plain[index]
        torch.manual_seed(index)  # the same draws: the same template
        b = flipped[index]
        assert torch.equal(b["jpg"], a["jpg"].flip(1))
        assert torch.equal(b["mask"], a["mask"].flip(1))
        assert a["caption"] == b["caption"]
    _assert_mask_marks_red_half(_item(flipped, "rotated.jpg"))


def test_random_crop_keeps_mask_on_the_marker(tmp_path):
    root = tmp_path / "tall"
    (root / "mask").mkdir(parents=True)
    image = np.zeros((90, 30, 3), np.uint8)
    image[40:50, 10:20] = 255  # white marker square inside every 30x30 window that covers rows 40..50
    mask = np.zeros((90, 30), np.uint8)
    mask[40:50, 10:20] = 255
    Image.fromarray(image).save(root / "tall.png")
    _save_mask(root / "mask" / "tall.png", mask)
    dataset = PersonalizedBase(root, size=30, center_crop=False, flip_p=0.5, interpolation="nearest")
    torch.manual_seed(0)
    marker_rows = set()
    for _ in range(12):
        item = dataset[0]
        on_mask = item["mask"] > 0.5
        assert on_mask.any() == (item["jpg"][..., 0] > 0).any()
        assert torch.equal(on_mask, item["jpg"][..., 0] > 0)  # same crop for image and mask
        if on_mask.any():
            marker_rows.add(int(on_mask.nonzero()[0, 0]))
    assert len(marker_rows) > 1  # the crop position really varies


def test_captions_share_one_template(concept):
    dataset = PersonalizedBase(concept, size=SIZE, placeholder_token="*", superclass="teddy")
    torch.manual_seed(0)
    seen = set()
    for index in range(len(dataset)):
        for _ in range(3):
            item = dataset[index]
            assert item["caption"] in {t.format("*") for t in DEFAULT_TEMPLATES}
            assert item["caption_superclass"] == item["caption"].replace("*", "teddy")
            seen.add(item["caption"])
    assert len(seen) > 3  # templates are drawn at random
    custom = PersonalizedBase(concept, size=SIZE, placeholder_token="<sks>", superclass="dog",
                              templates=["a {} on a table"])
    assert custom[0]["caption"] == "a <sks> on a table"
    assert custom[0]["caption_superclass"] == "a dog on a table"
    with pytest.raises(ValueError, match="exactly once"):
        PersonalizedBase(concept, templates=["a photo"])


def test_len_is_number_of_images_even_with_repeats(concept):
    with pytest.warns(UserWarning, match="max_steps"):
        dataset = PersonalizedBase(concept, size=SIZE, repeats=100)
    assert len(dataset) == 7
    # keys of the reference implementation's data configs that this dataset does not use: a warning with the reason
    import ldm.util

    ldm.util._warned_unused.clear()
    with pytest.warns(UserWarning, match="'per_image_tokens' is accepted but not used: Perfusion learns one word"):
        ldm.util.instantiate_from_config({"target": "perfusion.dataset.PersonalizedBase", "params": {
            "data_root": str(concept), "size": SIZE, "per_image_tokens": False}})


def test_missing_mask_names_image_and_fixes(concept):
    (concept / "mask" / "gray.png").unlink()
    with pytest.raises(FileNotFoundError, match="gray.png") as error:
        PersonalizedBase(concept, size=SIZE)
    assert "use_masks: false" in str(error.value) and "soft_segment.py" in str(error.value)
    shutil.rmtree(concept / "mask")
    dataset = PersonalizedBase(concept, size=SIZE, use_masks=False)
    for index in range(len(dataset)):
        assert torch.equal(dataset[index]["mask"], torch.ones(SIZE, SIZE))


def test_empty_mask_names_the_mask_file(concept):
    _save_mask(concept / "mask" / "palette.png", np.zeros((40, 40)))
    with pytest.raises(ValueError, match=r"mask.*palette\.png.*empty"):
        PersonalizedBase(concept, size=SIZE)


def test_missing_folder_or_no_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*soft_segment.py"):
        PersonalizedBase(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    (empty / "mask").mkdir(parents=True)
    Image.new("L", (8, 8)).save(empty / "mask" / "a.png")  # images in subfolders do not count
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no images.*readme.txt"):
        PersonalizedBase(empty)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_image_names_the_file(concept, damage):
    broken = concept / "broken.jpg"
    if damage == "garbage":
        broken.write_bytes(b"this is not an image at all" * 10)
    else:
        data = (concept / "photo.jpg").read_bytes()
        broken.write_bytes(data[: len(data) // 2])
    _save_mask(concept / "mask" / "broken.jpg", _left_half_mask(48, 40))
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.jpg"):
        PersonalizedBase(concept, size=SIZE)


@pytest.mark.parametrize(
    "bad, message",
    [({"size": 0}, "size"), ({"flip_p": 1.5}, "flip_p"), ({"interpolation": "cubic"}, "interpolation"),
     ({"set": "training"}, "set"), ({"superclass": " "}, "superclass")],
)
def test_bad_arguments_are_named(concept, bad, message):
    with pytest.raises(ValueError, match=message):
        PersonalizedBase(concept, **bad)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_seed_everything_makes_batches_reproducible_and_new_each_epoch(concept, monkeypatch, num_workers):
    """main.py seeds with seed_everything(seed, workers=True); its DataModule's loader (workers persistent, seeded
    by Lightning as the Trainer does) then gives the same batches for the same seed and new crops, flips and
    captions each epoch, in the main process and in workers."""
    import pytorch_lightning as pl
    from lightning_fabric.utilities.seed import pl_worker_init_function

    from main import DataModuleFromConfig

    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    data = DataModuleFromConfig(batch_size=7, num_workers=num_workers)
    data.datasets = {"train": PersonalizedBase(concept, size=16, center_crop=False, flip_p=0.5)}

    def three_epochs(seed):
        pl.seed_everything(seed, workers=True, verbose=False)
        loader = data.train_dataloader()
        loader.worker_init_fn = partial(pl_worker_init_function, rank=0) if num_workers else None
        return [next(iter(loader)) for _ in range(3)]

    def same(a, b):
        return (torch.equal(a["jpg"], b["jpg"]) and torch.equal(a["mask"], b["mask"])
                and a["caption"] == b["caption"] and a["path"] == b["path"])

    run_a, run_b, other = three_epochs(7), three_epochs(7), three_epochs(8)
    assert all(same(a, b) for a, b in zip(run_a, run_b))
    assert not same(run_a[0], run_a[1]) and not same(run_a[1], run_a[2])  # each epoch draws anew
    assert not same(run_a[0], other[0])
    by_path = [{p: (j, c) for p, j, c in zip(b["path"], b["jpg"], b["caption"])} for b in run_a[:2]]
    assert any(not torch.equal(by_path[0][p][0], by_path[1][p][0]) or by_path[0][p][1] != by_path[1][p][1]
               for p in by_path[0])  # the same image, augmented and captioned anew
