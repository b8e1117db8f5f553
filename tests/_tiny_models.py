"""Tiny Stable-Diffusion-shaped models of the same classes, with seeded random weights, for tests and the benchmark.

Zero-initialised layers (UNet output convs, transformer proj_out) are given small random values so that every
sub-network influences the output: a test comparing two implementations must not pass because a branch is zero.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config, save_state_dict

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIGS = {"sd1": REPO_ROOT / "configs/tiny/sd1-tiny.yaml", "sd2": REPO_ROOT / "configs/tiny/sd2-tiny.yaml",
                "sdxl": REPO_ROOT / "configs/tiny/sdxl-tiny.yaml"}


def tiny_config(family: str):
    if family not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny family '{family}' (use {sorted(TINY_CONFIGS)})")
    return OmegaConf.load(TINY_CONFIGS[family])


@torch.no_grad()
def randomize_zero_parameters(module: torch.nn.Module, generator: torch.Generator, std: float = 0.05) -> None:
    for p in module.parameters():
        if p.numel() and torch.count_nonzero(p) == 0:
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)


def build_tiny_model(family: str = "sd1", seed: int = 0):
    """A tiny LatentDiffusion of the given family, deterministic for a seed, in eval mode."""
    torch.manual_seed(seed)
    model = instantiate_from_config(tiny_config(family).model)
    randomize_zero_parameters(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def write_tiny_checkpoint(path: str | os.PathLike, family: str = "sd1", seed: int = 0):
    """Save a tiny model in the original checkpoint layout (``.ckpt`` or ``.safetensors``); returns the model."""
    model = build_tiny_model(family, seed)
    save_state_dict(model.state_dict(), path)
    return model
