"""PLMS sampler (Liu et al. 2022): linear multistep on the noise estimate, deterministic (eta = 0)."""
from __future__ import annotations

import torch

from ldm.models.diffusion.ddim import DDIMSampler


class PLMSSampler(DDIMSampler):
    """DDIM's update with a multistep noise estimate; the first step is a pseudo improved Euler (Heun) step."""

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0.0, verbose=False):
        if ddim_eta != 0:
            raise ValueError("PLMS is deterministic: eta must be 0")
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)

    def sampling_loop(self, x, cond, uncond, scale, verbose, log_every_t, temperature, callback, generator):
        self.old_eps: list[torch.Tensor] = []
        return super().sampling_loop(x, cond, uncond, scale, verbose, log_every_t, temperature, callback, generator)

    def denoise_step(self, x, t, index, context, guided, scale, temperature, generator):
        e_t = self.model_eps(x, t, context, guided, scale)
        old = self.old_eps
        if not old:
            x_next, _ = self.step_from_eps(x, e_t, index)
            prev_step = self.ddim_timesteps[max(index - 1, 0)]
            t_next = torch.full_like(t, int(prev_step))
            e_next = self.model_eps(x_next, t_next, context, guided, scale)
            e_prime = (e_t + e_next) / 2
        elif len(old) == 1:
            e_prime = (3 * e_t - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e_t - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        old.append(e_t)
        if len(old) > 3:
            old.pop(0)
        return self.step_from_eps(x, e_prime, index)
