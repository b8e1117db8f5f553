"""ClipSeg soft masks (transformers' CLIPSegForImageSegmentation) for concept images.

Heavy modules (torch, transformers) load on first use of a model symbol, so `clipseg.paths` stays cheap.
"""

from clipseg.paths import DEFAULT_DECODER_WEIGHTS, DOWNLOAD_HELP, ClipSegWeightsNotFound, check_weights_exist

_LAZY = {
    "ClipSegMasker": "clipseg.model",
    "load_clipseg": "clipseg.model",
    "load_clip_weights": "clipseg.model",
    "load_state_file": "clipseg.model",
    "build_offline_clip_tokenizer": "clipseg.model",
    "original_to_hf": "clipseg.convert",
    "infer_clipseg_config": "clipseg.convert",
    "read_torchscript_state_dict": "clipseg.torchscript",
}

__all__ = ["DEFAULT_DECODER_WEIGHTS", "DOWNLOAD_HELP", "ClipSegWeightsNotFound", "check_weights_exist", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clipseg' has no attribute {name!r}")
