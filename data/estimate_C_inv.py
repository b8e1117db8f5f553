"""Estimate C^-1, the inverse uncentered covariance of text-encoder token encodings, from a caption file.

    python data/estimate_C_inv.py --caption captions.txt --type clip \
        --ckpt ckpt/v1-5-pruned-emaonly.ckpt --save_path ckpt/C_inv.npy
    python data/estimate_C_inv.py --caption captions.txt --config configs/perfusion_inference_sd_v2.yaml \
        --ckpt ckpt/v2-1_512-ema-pruned.ckpt --save_path ckpt/C_inv_sd_v2.npy
    python data/estimate_C_inv.py --caption captions.txt --type sdxl \
        --ckpt ckpt/sd_xl_base_1.0.safetensors --save_path ckpt/C_inv_sdxl.npy

(the paths the training configs read: configs/perfusion_teddy.yaml, configs/perfusion_teddy_sd_v2.yaml and
configs/perfusion_teddy_sdxl.yaml). SD XL: the encoding is the 2048-wide concatenation of its two text encoders'
states (CLIP ViT-L 768 + OpenCLIP ViT-bigG 1280), what its cross-attention layers see, so C^-1 is 2048 x 2048.

C = (1/N) sum e e^T over REAL token positions only: the start token through the first EOS, inclusive
(padding excluded; why, and the maths, in perfusion/covariance.py). This file is the command line: arguments,
files, progress and messages.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ldm.util import BadValueError, ConfigError, MissingFileError, run_command  # noqa: E402
from perfusion.covariance import accumulate_second_moment, invert_covariance, save_c_inv  # noqa: E402

ENCODER_TARGETS = {
    "clip": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder", "params": {}},
    "openclip": {
        "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
        "params": {"layer": "penultimate"},
    },
    "sdxl": {"target": "ldm.modules.encoders.conditioner.SDXLConditioner", "params": {}},
}
# Checkpoint prefix of the text encoder(s), by encoder class: SD XL's live under conditioner.*
CKPT_PREFIXES = {"SDXLConditioner": "conditioner."}
DEFAULT_CKPT_PREFIX = "cond_stage_model."


def read_captions(path: str | Path, n_captions: int | None = None) -> list[str]:
    """Non-empty lines of ``path`` (stripped), the first ``n_captions`` of them when given."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"--caption file not found: {path} (expected a text file, one caption per line)")
    captions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not captions:
        raise BadValueError(f"--caption file {path} holds no captions")
    return captions[:n_captions] if n_captions else captions


def _encoder_config(args) -> dict:
    from omegaconf import OmegaConf

    if args.encoder_config:
        return OmegaConf.to_container(OmegaConf.load(args.encoder_config), resolve=True)
    if args.config:
        config = OmegaConf.load(args.config)
        cond = OmegaConf.select(config, "model.params.cond_stage_config")
        if cond is None:
            raise ConfigError(f"--config {args.config} has no model.params.cond_stage_config")
        return OmegaConf.to_container(cond, resolve=True)
    return ENCODER_TARGETS[args.type]


def build_encoder(args):
    """The frozen text encoder named by --encoder_config / --config / --type, with --ckpt weights loaded."""
    from ldm.modules.encoders.modules import load_text_encoder_weights
    from ldm.util import instantiate_from_config, load_state_dict

    config = _encoder_config(args)
    torch.manual_seed(args.seed)  # only matters for randomly initialised test encoders
    encoder = instantiate_from_config(config)
    if args.ckpt is not None:
        if args.ckpt_prefix is None:
            args.ckpt_prefix = CKPT_PREFIXES.get(config["target"].rsplit(".", 1)[-1], DEFAULT_CKPT_PREFIX)
        state = load_state_dict(args.ckpt)
        if Path(args.ckpt).is_dir():  # a diffusers folder: its SD 2.x text encoder lacks weights ours never uses
            from ldm.diffusers_format import fill_unused_text_encoder_weights

            fill_unused_text_encoder_weights(state, encoder, prefix=args.ckpt_prefix)
        load_text_encoder_weights(encoder, state, prefix=args.ckpt_prefix)
    return encoder.to(args.device).eval(), config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caption", required=True, help="text file, one caption per line (e.g. 100K LAION captions)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--type", choices=sorted(ENCODER_TARGETS), default="clip",
                        help="clip = SD 1.x CLIP ViT-L/14; openclip = SD 2.x OpenCLIP ViT-H/14 penultimate layer; "
                             "sdxl = SD XL's CLIP ViT-L/14 + OpenCLIP ViT-bigG/14 (2048 wide)")
    source.add_argument("--config", help="inference yaml; its model.params.cond_stage_config is the encoder")
    source.add_argument("--encoder_config", help=argparse.SUPPRESS)  # yaml with target/params (tests, tiny models)
    parser.add_argument("--ckpt", help="Stable Diffusion checkpoint holding the text encoder (cond_stage_model.*), "
                                       "or a diffusers model folder")
    parser.add_argument("--ckpt_prefix", default=None, help=argparse.SUPPRESS)  # default: by encoder class
    parser.add_argument("--save_path", required=True, help="output .npy (a .json with metadata is written beside it)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--n_captions", type=int, default=None, help="use the first N captions (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eps", type=float, default=0.0, help="ridge added to C before inversion (default 0)")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.eps < 0:
        parser.error("--eps must be >= 0")
    if args.n_captions is not None and args.n_captions < 1:
        parser.error("--n_captions must be >= 1")
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    return args


def check_arguments(args) -> None:
    """Every file argument, before the (possibly hours-long) covariance pass: output path, checkpoint, configs."""
    if not Path(args.caption).is_file():
        raise MissingFileError(f"--caption file not found: {args.caption} (expected a text file, one caption per "
                               "line)")
    save = Path(args.save_path)
    if save.suffix.lower() != ".npy" or save.is_dir():
        raise BadValueError(f"--save_path {save}: give a file name ending in .npy (e.g. ckpt/C_inv.npy)")
    try:
        save.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BadValueError(f"--save_path {save}: cannot create the folder {save.parent} ({err.strerror})") from err
    if not os.access(save.parent, os.W_OK):
        raise BadValueError(f"--save_path {save}: the folder {save.parent} is not writable")
    if args.ckpt is not None and Path(args.ckpt).is_dir():
        from ldm.diffusers_format import diffusers_folder_problem

        problem = diffusers_folder_problem(args.ckpt)
        if problem:
            raise BadValueError(f"--ckpt {args.ckpt}: {problem}")
    for flag in ("ckpt", "config", "encoder_config"):
        value = getattr(args, flag)
        if value is not None and not (Path(value).is_file() or (flag == "ckpt" and Path(value).is_dir())):
            raise MissingFileError(f"--{flag} {value}: file not found")
    if args.ckpt is None and not args.encoder_config:
        raise BadValueError(
            "--ckpt is required with --type/--config: the text encoder's weights come from the Stable Diffusion "
            "checkpoint (e.g. --ckpt ckpt/v1-5-pruned-emaonly.ckpt)")


def main(argv=None) -> int:
    args = parse_args(argv)
    check_arguments(args)
    captions = read_captions(args.caption, args.n_captions)
    encoder, config = build_encoder(args)
    second_moment, n_tokens = accumulate_second_moment(
        encoder, captions, args.batch_size, args.device,
        progress=lambda batches: tqdm(batches, desc="token covariance", unit="batch"))
    c_inv, condition = invert_covariance(second_moment, n_tokens, args.eps)
    encoder_name = f"{config['target'].rsplit('.', 1)[-1]}({', '.join(f'{k}={v}' for k, v in (config.get('params') or {}).items())})"
    meta = {
        "encoder": encoder_name,
        "encoder_config": config,
        "ckpt": args.ckpt,
        "captions_file": str(args.caption),
        "n_captions": len(captions),
        "n_tokens": n_tokens,
        "token_positions": "start token through first EOS (padding excluded)",
        "eps": args.eps,
    }
    path = save_c_inv(args.save_path, c_inv, meta)
    print(f"{len(captions)} captions, N = {n_tokens} token vectors, D = {c_inv.shape[0]}, "
          f"condition number of C = {condition:.4g}")
    print(f"saved {path} and {path.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
