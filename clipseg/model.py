"""ClipSeg soft masks on top of transformers' CLIPSegForImageSegmentation.

`load_clipseg` accepts either a transformers folder (e.g. a local copy of CIDAS/clipseg-rd64-refined) or the
original decoder weights `rd64-uni-refined.pth` plus CLIP ViT-B/16 weights, converted with `clipseg.convert`.
`ClipSegMasker.masks` turns images + text prompts into soft masks in [0, 1] at each image's own size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from clipseg.convert import hf_clip_model_to_clipseg, infer_clipseg_config, original_to_hf
from clipseg.paths import ClipSegWeightsNotFound, check_weights_exist, default_clip_candidates, missing_weights_message
from clipseg.torchscript import is_torchscript_archive, read_torchscript_state_dict
from ldm.modules.encoders.modules import build_offline_clip_tokenizer
from ldm.util import CheckpointError, load_state_dict

CLIPSEG_IMAGE_SIZE = 352
# ClipSeg was trained on ImageNet-normalised inputs (the original repository's example and the
# CIDAS/clipseg-* preprocessor configs), not on CLIP's own mean/std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def load_tokenizer(folder: str | os.PathLike | None = None):
    """The folder's own tokenizer files when it has them, else the offline CLIP tokenizer."""
    if folder is not None and any((Path(folder) / name).is_file() for name in _TOKENIZER_FILES):
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(os.fspath(folder), local_files_only=True)
    return build_offline_clip_tokenizer()


class ClipSegMasker:
    """Soft masks from a CLIPSegForImageSegmentation: mean over prompts of sigmoid(logits)."""

    def __init__(self, model, tokenizer, image_size: int = CLIPSEG_IMAGE_SIZE,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        patch_size = model.config.vision_config.patch_size
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of the ViT patch size {patch_size}.")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        # CLIPSegProcessor's image processor (ViT) with the PIL backend: PIL bilinear resize, as the CIDAS
        # processor does, then /255 and normalisation.
        from transformers import ViTImageProcessorPil

        self.image_processor = ViTImageProcessorPil(size={"height": self.image_size, "width": self.image_size},
                                                    image_mean=list(mean), image_std=list(std))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "ClipSegMasker":
        self.model.to(device)
        return self

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> (B, 3, S, S) normalised float32 pixels."""
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(P, projection_dim) conditional embeddings, CLIP text features of the prompts."""
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt").to(self.device)
        features = self.model.clip.get_text_features(input_ids=tokens["input_ids"],
                                                     attention_mask=tokens["attention_mask"])
        # transformers 5 returns a model output whose pooler_output is projected; 4.x returned the tensor.
        return features if isinstance(features, torch.Tensor) else features.pooler_output

    @torch.no_grad()
    def logits(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """(B, P, S, S) raw ClipSeg logits for every image/prompt pair."""
        dtype = next(self.model.parameters()).dtype
        pixels = self.preprocess(images).to(self.device, dtype)
        conditionals = self.encode_prompts(prompts).to(dtype)
        n_images, n_prompts = len(images), len(prompts)
        output = self.model(pixel_values=pixels.repeat_interleave(n_prompts, dim=0),
                            conditional_embeddings=conditionals.repeat(n_images, 1))
        return output.logits.reshape(n_images, n_prompts, *output.logits.shape[-2:])

    @torch.no_grad()
    def masks(self, images: Sequence[Image.Image], prompts: str | Sequence[str]) -> list[torch.Tensor]:
        """One float32 (H, W) CPU tensor in [0, 1] per image, at that image's size: mean sigmoid over prompts."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise ValueError(f"prompts must be non-empty strings, got {prompts!r}")
        if not images:
            return []
        mean_probability = torch.sigmoid(self.logits(images, prompts).float()).mean(dim=1)
        masks = []
        for probability, image in zip(mean_probability, images):
            width, height = image.size
            resized = F.interpolate(probability[None, None], size=(height, width), mode="bilinear",
                                    align_corners=False)[0, 0]
            masks.append(resized.clamp_(0.0, 1.0).cpu())
        return masks


def load_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a weight file without running pickled code: safetensors, TorchScript archive, or state dict."""
    path = os.fspath(path)
    if not path.endswith(".safetensors") and is_torchscript_archive(path):
        return read_torchscript_state_dict(path)
    try:
        tensors = load_state_dict(path)
    except CheckpointError as error:  # a pickle that needs arbitrary globals, or not a torch file at all
        raise ValueError(str(error)) from error
    if tensors and all(k.startswith("module.") for k in tensors):  # saved from DataParallel/DDP
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def load_clip_weights(clip_path: str | os.PathLike) -> tuple[dict, dict, Path | None]:
    """CLIP ViT-B/16 weights from any accepted source.

    Returns (state, heads, tokenizer_folder): `state` is either OpenAI layout (`visual.conv1.weight`, ...) or
    already CLIPSeg `clip.*` keys; `heads` holds head counts read from a transformers config when available.
    """
    path = Path(clip_path).expanduser()
    if not path.exists():
        raise ClipSegWeightsNotFound(missing_weights_message("CLIP ViT-B/16 weights", path))
    heads: dict = {}
    tokenizer_folder = None
    if path.is_dir():
        files = [path / name for name in _WEIGHT_FILES if (path / name).is_file()]
        if not files:
            raise ValueError(f"{path}: no weights file ({', '.join(_WEIGHT_FILES)}) in this folder.")
        if (path / "config.json").is_file():
            config = _read_json(path / "config.json")
            heads = {
                "text_heads": config.get("text_config", {}).get("num_attention_heads"),
                "vision_heads": config.get("vision_config", {}).get("num_attention_heads"),
            }
        tokenizer_folder = path
        path = files[0]
    state = load_state_file(path)
    if "visual.conv1.weight" in state:  # OpenAI / open_clip layout
        return state, heads, tokenizer_folder
    if any(k.endswith("vision_model.embeddings.patch_embedding.weight") for k in state):  # transformers CLIPModel
        return hf_clip_model_to_clipseg(state), heads, tokenizer_folder
    raise ValueError(
        f"{path}: not recognised as CLIP weights (expected OpenAI/open_clip keys like 'visual.conv1.weight' or "
        "transformers keys like 'vision_model.embeddings.patch_embedding.weight')."
    )


def _load_original(decoder_path: Path, clip_path, *, extract_layers, vision_heads, text_heads, decoder_heads):
    decoder_state = load_state_file(decoder_path)
    clip_state = {k[len("clip_model."):]: v for k, v in decoder_state.items() if k.startswith("clip_model.")}
    decoder_state = {k: v for k, v in decoder_state.items() if not k.startswith("clip_model.")}
    heads: dict = {}
    tokenizer_folder = None
    if not clip_state:  # decoder-only .pth (the released rd64-uni-refined.pth): the backbone comes separately
        if clip_path is None:
            candidates = default_clip_candidates(decoder_path)
            clip_path = next((c for c in candidates if c.exists()), None)
            if clip_path is None:
                raise ClipSegWeightsNotFound(missing_weights_message(
                    f"CLIP ViT-B/16 backbone (needed with the decoder-only {decoder_path.name})",
                    "searched " + ", ".join(map(str, candidates))))
        clip_state, heads, tokenizer_folder = load_clip_weights(clip_path)
    if any(k.startswith("clip.") for k in clip_state):
        hf_state = {**hf_clip_model_to_clipseg(clip_state), **original_to_hf({}, decoder_state)}
    else:
        hf_state = original_to_hf(clip_state, decoder_state)
    config = infer_clipseg_config(
        hf_state, extract_layers=extract_layers, decoder_heads=decoder_heads,
        vision_heads=vision_heads or heads.get("vision_heads"), text_heads=text_heads or heads.get("text_heads"),
    )
    from transformers import CLIPSegForImageSegmentation

    model = CLIPSegForImageSegmentation(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(hf_state)), sorted(set(hf_state) - expected)
    if missing or unexpected:
        raise ValueError(f"Converted ClipSeg weights do not fit the model: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}")
    model.load_state_dict(hf_state, strict=True)
    return model.float(), load_tokenizer(tokenizer_folder), {}


def _load_transformers_folder(folder: Path):
    from transformers import CLIPSegForImageSegmentation

    model = CLIPSegForImageSegmentation.from_pretrained(os.fspath(folder), local_files_only=True,
                                                        dtype=torch.float32)
    processor = {}
    if (folder / "preprocessor_config.json").is_file():
        config = _read_json(folder / "preprocessor_config.json")
        size = config.get("size")
        if isinstance(size, Mapping):
            size = size.get("height") or size.get("shortest_edge")
        if size:
            processor["image_size"] = int(size)
        if config.get("do_normalize", True) and config.get("image_mean") and config.get("image_std"):
            processor["mean"], processor["std"] = config["image_mean"], config["image_std"]
    return model, load_tokenizer(folder), processor


def load_clipseg(weights_path_or_dir: str | os.PathLike, clip_path: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", *, image_size: int | None = None,
                 extract_layers: Sequence[int] | None = None, vision_heads: int | None = None,
                 text_heads: int | None = None, decoder_heads: int = 4) -> ClipSegMasker:
    """Load ClipSeg as a ready-to-use ClipSegMasker.

    weights_path_or_dir: a transformers CLIPSeg folder (config.json + weights [+ tokenizer/preprocessor files]),
      or an original ClipSeg .pth (decoder only, as released, or a full state dict with `clip_model.*`).
    clip_path: CLIP ViT-B/16 weights for a decoder-only .pth: OpenAI's ViT-B-16.pt (TorchScript, read without
      executing it), an OpenAI/open_clip state dict (.pt/.pth/.bin/.safetensors), or a transformers
      openai/clip-vit-base-patch16 folder. Default: ViT-B-16.pt next to the .pth, in ./clipseg/weights/ or in
      ~/.cache/clip/.
    The keyword-only arguments describe non-standard original checkpoints (defaults: ClipSeg rd64 / ViT-B/16).
    """
    path = check_weights_exist(weights_path_or_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ClipSegWeightsNotFound(missing_weights_message("config.json of the transformers ClipSeg folder",
                                                                 path / "config.json"))
        model_type = _read_json(path / "config.json").get("model_type")
        if model_type != "clipseg":
            raise ValueError(f"{path} holds a '{model_type}' model, not a transformers ClipSeg (model_type "
                             "'clipseg'). Pass CLIP folders as clip_path/--clip_weight instead.")
        model, tokenizer, processor = _load_transformers_folder(path)
    else:
        model, tokenizer, processor = _load_original(
            path, clip_path, extract_layers=extract_layers, vision_heads=vision_heads, text_heads=text_heads,
            decoder_heads=decoder_heads)
    if image_size is not None:
        processor["image_size"] = image_size
    processor.setdefault("image_size", CLIPSEG_IMAGE_SIZE)
    return ClipSegMasker(model.to(device), tokenizer, **processor)
