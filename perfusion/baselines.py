"""Baselines trained through main.py next to Perfusion (docs/method.md section 10, "Ablations and baselines").

``TextualInversion``: only the placeholder's word embedding trains; the UNet keeps its plain cross-attention K/V
projections (no rank-one edit, no C^-1). Same data, masked loss, optimiser and embedding learning rate as Perfusion,
so the edit is the only difference. Its concept file holds the embedding alone (format version 2, no value
outputs) and loads with ``scripts/perfusion_txt2img.py --personalized_ckpt`` like any concept: base model plus the
learned word, no edit.

DreamBooth needs no class: ``configs/toy/dreambooth_star.yaml`` fine-tunes the whole UNet of a plain
``LatentDiffusion`` (main.py exports it with ``BaseModelExport``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from perfusion.concept_file import save_concept
from perfusion.perfusion import Perfusion

TEXTUAL_INVERSION = "textual_inversion"


class TextualInversion(Perfusion):
    """Perfusion without the edit: the learned embedding is the whole concept (Gal et al., 2022)."""

    edits_cross_attention = False

    def __init__(self, *args, lock_keys: bool = True, **kwargs):
        if not lock_keys:
            raise ValueError("TextualInversion edits no keys: lock_keys does not apply (leave it out)")
        super().__init__(*args, **kwargs)

    def apply_training_targets(self) -> None:
        """No edit to install (and no C^-1 needed); i* and i_super are still tracked, but only for the logs."""

    def concept_metadata(self) -> dict:
        metadata = super().concept_metadata()
        for key in ("beta", "tau", "train_beta", "train_tau"):  # no gate
            metadata.pop(key, None)
        return {**metadata, "method": TEXTUAL_INVERSION, "c_inv_hash": None}

    @torch.no_grad()
    def save_concept_file(self, path: str | Path) -> str:
        if not bool(self.targets_initialized):
            raise RuntimeError("no concept to save yet: nothing has been trained")
        return save_concept(path, value_outputs={}, embedding=self.embedding_manager.embeddings[0],
                            metadata=self.concept_metadata())
