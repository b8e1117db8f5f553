"""Validation prompts during training: fixed prompts sampled with the current concept at a few betas, every N
optimizer steps, as one labelled grid (rows: prompts, columns: betas) in TensorBoard and as a PNG, so that the step
to keep can be picked by eye.

    lightning:
      callbacks:
        validation:
          target: perfusion.validation.ValidationPrompts
          params:
            prompts: ["a photo of a {}", "a {} on the beach"]   # or prompts_file: one prompt per line
            every_n_steps: 100

The initial noise is the same for every prompt's row, beta and step (``seed``), so that grids of successive steps
differ only by what the concept learned. Costs per log: len(prompts) x len(betas) guided samples of ``steps``
steps; ``python scripts/benchmark.py --training-extras`` measures its share of a default run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger

from ldm.util import BadValueError, MissingFileError
from perfusion.roe import INFERENCE_TAU

DEFAULT_PROMPTS = ("a photo of a {}", "a {} on the beach")
DEFAULT_BETAS = (0.6, 0.7)


def read_prompts(prompts: Sequence[str] | None, prompts_file: str | None) -> list[str]:
    """Prompts with ``{}`` for the concept word, from the config list or a file (one per line, # comments)."""
    if prompts is not None and prompts_file is not None:
        raise BadValueError("ValidationPrompts: give prompts or prompts_file, not both")
    if prompts_file is not None:
        path = Path(prompts_file).expanduser()
        if not path.is_file():
            raise MissingFileError(f"ValidationPrompts: prompts_file {path} does not exist")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        prompts = [line for line in lines if line and not line.startswith("#")]
    prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
    if not prompts:
        raise BadValueError("ValidationPrompts: no prompts given")
    missing = [p for p in prompts if "{}" not in p]
    if missing:
        raise BadValueError(f"ValidationPrompts: prompts must name the concept with {{}}: {missing}")
    return prompts


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def labelled_grid(tiles: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str], column_labels: Sequence[str],
                  tile_side: int = 128, label_width: int = 220) -> Image.Image:
    """A white sheet: one row per label, one column per label, tiles (H, W, 3 uint8) resized to ``tile_side``."""
    pad, head = 4, 20
    sheet = Image.new("RGB", (label_width + len(column_labels) * (tile_side + pad),
                              head + len(row_labels) * (tile_side + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, label in enumerate(column_labels):
        draw.text((label_width + j * (tile_side + pad), 4), label, fill=(0, 0, 0))
    resample = Image.Resampling.NEAREST if tiles[0][0].shape[0] < tile_side else Image.Resampling.LANCZOS
    for i, (label, row) in enumerate(zip(row_labels, tiles)):
        y = head + i * (tile_side + pad)
        draw.text((4, y + tile_side // 2 - 6), label[:36], fill=(0, 0, 0))
        for j, tile in enumerate(row):
            image = Image.fromarray(tile).resize((tile_side, tile_side), resample)
            sheet.paste(image, (label_width + j * (tile_side + pad), y))
    return sheet


class ValidationPrompts(Callback):
    """Every ``every_n_steps`` optimizer steps (and after the last), sample each prompt with the concept at each of
    ``betas`` (gate temperature ``tau``): DDIM, ``steps`` steps, guidance ``scale`` (default: the model's
    sample_scale), fixed noise from ``seed``. Writes ``<log folder>/images/validation/step-NNNNNN.png`` and the
    TensorBoard image ``validation/grid``."""

    def __init__(self, prompts: Sequence[str] | None = None, prompts_file: str | None = None,
                 every_n_steps: int = 100, betas: Sequence[float] = DEFAULT_BETAS, tau: float = INFERENCE_TAU,
                 steps: int = 20, scale: float | None = None, seed: int = 0, tile_side: int = 128):
        self.prompts = read_prompts(prompts, prompts_file)
        if int(every_n_steps) < 1:
            raise BadValueError(f"ValidationPrompts: every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.betas, self.tau = int(every_n_steps), [float(b) for b in betas], float(tau)
        if not self.betas:
            raise BadValueError("ValidationPrompts: betas is empty")
        self.steps, self.scale, self.seed, self.tile_side = int(steps), scale, int(seed), int(tile_side)
        self.logged_steps: list[int] = []

    @torch.no_grad()
    def sample(self, model) -> list[list[np.ndarray]]:
        """tiles[prompt][beta] as uint8 arrays; the model's gating is put back as training left it."""
        from sgm.sampling import sample as sample_model

        placeholder = model.embedding_manager.placeholder_strings[0]
        prompts = [p.replace("{}", placeholder) for p in self.prompts]
        c = model.get_learned_conditioning(prompts)
        uc = model.get_learned_conditioning([""] * len(prompts))
        side = model.image_size
        generator = torch.Generator().manual_seed(self.seed)
        x_T = torch.randn(1, model.channels, side, side, generator=generator).expand(len(prompts), -1, -1, -1)
        x_T = x_T.contiguous().to(model.device)
        scale = model.sample_scale if self.scale is None else float(self.scale)
        columns = []
        try:
            for beta in self.betas:
                model.apply_training_targets()
                model.edit_state.set_gating(beta, self.tau)
                latents = sample_model(model, c, x_T, uc, steps=self.steps, scale=scale)
                columns.append(to_uint8(model.decode_first_stage(latents)))
        finally:
            model.apply_training_targets()
        return [[column[i] for column in columns] for i in range(len(prompts))]

    def write_grid(self, trainer, model) -> Image.Image:
        was_training = model.training
        model.eval()
        try:
            tiles = self.sample(model)
        finally:
            model.train(was_training)
        grid = labelled_grid(tiles, self.prompts, [f"beta {b:g}, tau {self.tau:g}" for b in self.betas],
                             self.tile_side)
        step = trainer.global_step
        folder = Path(trainer.default_root_dir) / "images" / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        grid.save(folder / f"step-{step:06d}.png")
        if isinstance(trainer.logger, TensorBoardLogger):
            array = torch.from_numpy(np.asarray(grid)).permute(2, 0, 1)
            trainer.logger.experiment.add_image("validation/grid", array, global_step=step)
        self.logged_steps.append(step)
        return grid

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step not in self.logged_steps and trainer.is_global_zero:
            if bool(pl_module.targets_initialized):
                self.write_grid(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step not in self.logged_steps and trainer.is_global_zero:
            if bool(pl_module.targets_initialized):
                self.write_grid(trainer, pl_module)
