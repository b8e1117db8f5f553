"""Exponential moving average of a model's trainable parameters, stored as buffers (checkpointed)."""
from __future__ import annotations

import torch
import torch.nn as nn


class LitEma(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_updates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError("EMA decay must be between 0 and 1")
        self.name_map: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                buffer_name = name.replace(".", "")
                self.name_map[name] = buffer_name
                self.register_buffer(buffer_name, p.detach().clone().data)
        self.collected: list[torch.Tensor] = []

    @torch.no_grad()
    def forward(self, model: nn.Module):
        decay = float(self.decay)
        if self.num_updates >= 0:
            self.num_updates += 1
            decay = min(decay, (1 + float(self.num_updates)) / (10 + float(self.num_updates)))
        shadow = dict(self.named_buffers())
        pairs = [(shadow[self.name_map[name]], p.detach()) for name, p in model.named_parameters()
                 if name in self.name_map]
        if pairs:  # shadow <- shadow + (1 - decay) (param - shadow), in one fused pass over all tensors
            shadows, params = zip(*pairs)
            torch._foreach_lerp_(list(shadows), [p.to(s.dtype) for s, p in pairs], 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module):
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.name_map:
                p.data.copy_(shadow[self.name_map[name]].data)

    def store(self, parameters):
        self.collected = [p.detach().clone() for p in parameters]

    def restore(self, parameters):
        for saved, p in zip(self.collected, parameters):
            p.data.copy_(saved.data)
        self.collected = []
