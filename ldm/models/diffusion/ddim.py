"""DDIM sampler (Song et al. 2021) with classifier-free guidance in one batched UNet call per step."""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm


def make_ddim_timesteps(num_ddim_steps: int, num_ddpm_timesteps: int, discretize: str = "uniform") -> np.ndarray:
    """Timesteps of the DDIM sub-sequence, ascending; shifted by +1 like the original (and diffusers' 'leading'
    spacing with steps_offset=1)."""
    if discretize == "uniform":
        stride = num_ddpm_timesteps // num_ddim_steps
        steps = np.arange(0, num_ddpm_timesteps, stride)[:num_ddim_steps]
    elif discretize == "quad":
        steps = (np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_steps) ** 2).astype(int)
    else:
        raise ValueError(f"unknown DDIM discretization '{discretize}' (uniform or quad)")
    return steps + 1


class DDIMSampler:
    def __init__(self, model, schedule: str = "linear"):
        self.model = model
        self.num_ddpm_timesteps = model.num_timesteps
        self.schedule = schedule

    # ----- schedule -------------------------------------------------------------------------------------------
    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = False):
        if not 0 < ddim_num_steps < self.num_ddpm_timesteps:  # timesteps are shifted by +1
            raise ValueError(f"steps must be between 1 and {self.num_ddpm_timesteps - 1}, got {ddim_num_steps}")
        self.ddim_timesteps = make_ddim_timesteps(ddim_num_steps, self.num_ddpm_timesteps, ddim_discretize)
        alphas_cumprod = self.model.alphas_cumprod.detach().double().cpu()
        alphas = alphas_cumprod[self.ddim_timesteps]
        alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.ddim_timesteps[:-1]]])
        sigmas = ddim_eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
        if ddim_eta == 0:  # deterministic; 0 * (0 / 0) must not make a NaN where alpha_bar rounds to 1
            sigmas = torch.zeros_like(sigmas)
        device = self.model.alphas_cumprod.device
        self.ddim_alphas = alphas.float().to(device)
        self.ddim_alphas_prev = alphas_prev.float().to(device)
        self.ddim_sigmas = sigmas.float().to(device)
        self.ddim_sqrt_one_minus_alphas = torch.sqrt(1.0 - alphas).float().to(device)
        self.ddim_eta = ddim_eta

    # ----- one model evaluation with guidance ---------------------------------------------------------------
    @staticmethod
    def guidance_context(cond, uncond, scale: float):
        """Conditioning for one batched call: [uncond; cond] when guiding, built once per sampling run so the
        same tensor object is fed to the UNet at every step (lets prompt-only work be cached)."""
        if uncond is None or scale == 1.0:
            return cond
        if isinstance(cond, dict):
            return {k: [torch.cat([u, c]) for u, c in zip(uncond[k], cond[k])] for k in cond}
        return torch.cat([uncond, cond])

    def model_eps(self, x, t, context, guided: bool, scale: float):
        """Noise prediction at (x, t), guided: eps_u + scale (eps_c - eps_u), in one UNet call."""
        if guided:
            out_uncond, out_cond = self.model.apply_model(torch.cat([x, x]), torch.cat([t, t]), context).chunk(2)
            out = out_uncond + scale * (out_cond - out_uncond)
        else:
            out = self.model.apply_model(x, t, context)
        if self.model.parameterization == "v":
            return self.model.predict_eps_from_z_and_v(x, t, out)
        return out

    def step_from_eps(self, x, e_t, index: int, temperature: float = 1.0, generator=None):
        """x_{t-1} and the x0 estimate from the noise estimate at DDIM index ``index``."""
        a_t = self.ddim_alphas[index]
        a_prev = self.ddim_alphas_prev[index]
        sigma_t = self.ddim_sigmas[index]
        pred_x0 = (x - self.ddim_sqrt_one_minus_alphas[index] * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
        x_prev = a_prev.sqrt() * pred_x0 + dir_xt
        if sigma_t > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x_prev = x_prev + sigma_t * temperature * noise
        return x_prev, pred_x0

    # ----- sampling loop --------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape, conditioning=None, eta: float = 0.0, x_T=None,
               unconditional_guidance_scale: float = 1.0, unconditional_conditioning=None, verbose: bool = True,
               log_every_t: int = 100, temperature: float = 1.0, callback=None, generator=None):
        self.make_schedule(S, ddim_eta=eta)
        device = self.model.betas.device
        size = (batch_size, *shape)
        x = x_T if x_T is not None else torch.randn(size, generator=generator, device=device)
        return self.sampling_loop(x, conditioning, unconditional_conditioning, unconditional_guidance_scale,
                                  verbose, log_every_t, temperature, callback, generator)

    def sampling_loop(self, x, cond, uncond, scale, verbose, log_every_t, temperature, callback, generator):
        guided = uncond is not None and scale != 1.0
        context = self.guidance_context(cond, uncond, scale)
        timesteps = np.flip(self.ddim_timesteps)
        intermediates = {"x_inter": [x], "pred_x0": [x]}
        iterator = tqdm(timesteps, desc=f"{type(self).__name__}", total=len(timesteps), disable=not verbose)
        for i, step in enumerate(iterator):
            index = len(timesteps) - i - 1
            t = torch.full((x.shape[0],), int(step), device=x.device, dtype=torch.long)
            x, pred_x0 = self.denoise_step(x, t, index, context, guided, scale, temperature, generator)
            if callback is not None:
                callback(i)
            if index % log_every_t == 0 or index == len(timesteps) - 1:
                intermediates["x_inter"].append(x)
                intermediates["pred_x0"].append(pred_x0)
        return x, intermediates

    def denoise_step(self, x, t, index, context, guided, scale, temperature, generator):
        e_t = self.model_eps(x, t, context, guided, scale)
        return self.step_from_eps(x, e_t, index, temperature, generator)
