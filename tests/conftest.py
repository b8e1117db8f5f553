import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


class TinyWorld:
    """A tiny SD1-structured base checkpoint, the C^-1 of its text encoder, and a toy concept folder."""

    def __init__(self, root: Path, family: str = "sd1", c_inv_captions: int = 300):
        from tests._tiny_models import write_tiny_checkpoint
        from tests._tiny_concept import write_toy_c_inv, write_toy_concept_images

        self.root = root
        self.family = family
        self.ckpt = root / f"tiny-{family}.safetensors"
        self.base_model = write_tiny_checkpoint(self.ckpt, family, seed=11)
        self.c_inv_captions = c_inv_captions
        self.c_inv = write_toy_c_inv(self.base_model.cond_stage_model, root / f"C_inv_{family}.npy",
                                     n_captions=c_inv_captions)
        self.data_root = root / "teddy"
        write_toy_concept_images(self.data_root, n=4, size=32, seed=5)
        self.base_config = Path(f"configs/tiny/{family}-tiny.yaml")
        # SD XL: Perfusion's SD XL class and embedding manager on top of the generic tiny Perfusion settings
        self.perfusion_overlays = ["configs/tiny/perfusion-tiny.yaml"] + (
            ["configs/tiny/perfusion-sdxl-tiny.yaml"] if family == "sdxl" else [])

    def perfusion_config(self, **overrides):
        from omegaconf import OmegaConf

        config = OmegaConf.merge(OmegaConf.load(self.base_config),
                                 *(OmegaConf.load(path) for path in self.perfusion_overlays))
        config.model.params.ckpt_path = str(self.ckpt)
        config.model.params.C_inv_path = str(self.c_inv)
        config.data.params.train.params.data_root = str(self.data_root)
        for key, value in overrides.items():
            OmegaConf.update(config, key, value)
        return config

    def cli_overrides(self):
        return [f"model.params.ckpt_path={self.ckpt}", f"model.params.C_inv_path={self.c_inv}",
                f"data.params.train.params.data_root={self.data_root}"]


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    return TinyWorld(tmp_path_factory.mktemp("tiny_world"))


@pytest.fixture(scope="session")
def tiny_world_sd2(tmp_path_factory):
    return TinyWorld(tmp_path_factory.mktemp("tiny_world_sd2"), family="sd2")


@pytest.fixture(scope="session")
def tiny_world_sdxl(tmp_path_factory):
    # 150 captions: ~1,650 real-token vectors for the tiny model's 1280-wide context (C^-1 also has a ridge 1e-6)
    return TinyWorld(tmp_path_factory.mktemp("tiny_world_sdxl"), family="sdxl", c_inv_captions=150)
