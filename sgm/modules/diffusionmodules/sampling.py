"""ODE/SDE samplers over a noise-level discretization (Karras et al. 2022; DPM-Solver++).

Every sampler is called as  sampler(denoiser, x, cond, uc=None, num_steps=None, generator=None),
where denoiser(x, sigma, cond) -> x0 estimate (see sgm.sampling.make_denoiser_fn) and x is
standard-normal noise. Samplers share the loop machinery and differ only in `sampler_step`.

They work on the variance-exploding state x_ve = x0 + sigma * eps; a DDPM state x_t is x_ve / sqrt(1 + sigma^2)
with sigma^2 = (1 - alpha_bar_t) / alpha_bar_t. The result is returned in the DDPM scaling of the last sigma
(the data itself when it is 0, as for most discretizations). In these coordinates the original DDIM update is an
Euler step of the probability-flow ODE (eta = 0) or an ancestral Euler step (eta > 0), and PLMS is a linear
multistep method on the same slope d = (x - D(x)) / sigma, which is the noise estimate eps.
"""
from typing import Any, Callable, Mapping, Optional, Tuple

import torch
from tqdm.auto import tqdm

from ...util import append_dims, default, instantiate_from_config

DenoiserFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]

DEFAULT_GUIDER = {"target": "sgm.modules.diffusionmodules.guiders.IdentityGuider"}


def randn_like(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard-normal noise shaped like x, drawn from `generator` (on its own device) when given."""
    if generator is None:
        return torch.randn_like(x)
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    return noise.to(x.device)


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Probability-flow ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def get_ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split the step sigma_from -> sigma_to into a deterministic part down to sigma_down and
    fresh noise of size sigma_up, with sigma_down^2 + sigma_up^2 = sigma_to^2."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


class BaseDiffusionSampler:
    def __init__(
        self,
        discretization_config: Mapping,
        num_steps: Optional[int] = None,
        guider_config: Optional[Mapping] = None,
        verbose: bool = False,
        device="cpu",
    ):
        self.num_steps = num_steps
        self.discretization = instantiate_from_config(discretization_config)
        self.guider = instantiate_from_config(default(guider_config, DEFAULT_GUIDER))
        self.verbose = verbose
        self.device = device

    def prepare_sampling_loop(self, x: torch.Tensor, cond: Any, uc: Any = None, num_steps: Optional[int] = None):
        num_steps = default(num_steps, self.num_steps)
        if num_steps is None:
            raise ValueError(f"{type(self).__name__}: give num_steps in the config or in the call.")
        sigmas = self.discretization(num_steps, device=self.device).to(x.device)
        uc = default(uc, cond)
        # x arrives as unit-variance noise; the VE state at sigma_max has variance 1 + sigma_max^2
        # (exactly so for a DDPM x_T ~ N(0, I), since x = x_T * sqrt(1 + sigma^2)).
        x = x * torch.sqrt(1.0 + sigmas[0] ** 2.0)
        num_sigmas = len(sigmas)
        s_in = x.new_ones([x.shape[0]])
        return x, s_in, sigmas, num_sigmas, cond, uc

    def denoise(self, x: torch.Tensor, denoiser: DenoiserFn, sigma: torch.Tensor, cond: Any, uc: Any) -> torch.Tensor:
        denoised = denoiser(*self.guider.prepare_inputs(x, sigma, cond, uc))
        return self.guider(denoised, sigma)

    @staticmethod
    def finish(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """The final state in DDPM scaling: x at the last sigma (x itself when that is 0)."""
        return x / torch.sqrt(1.0 + sigmas[-1] ** 2.0)

    def get_sigma_gen(self, num_sigmas: int):
        """Step indices 0 .. num_sigmas - 2, with a progress bar when verbose."""
        steps = num_sigmas - 1
        desc = f"Sampling with {type(self).__name__} for {steps} steps"
        yield from tqdm(range(steps), total=steps, desc=desc, disable=not self.verbose)


class SingleStepDiffusionSampler(BaseDiffusionSampler):
    def sampler_step(self, sigma, next_sigma, denoiser, x, cond, uc, *args, **kwargs):
        raise NotImplementedError

    def euler_step(self, x: torch.Tensor, d: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        return x + dt * d


class EDMSampler(SingleStepDiffusionSampler):
    """Karras et al. Algorithm 2; s_churn > 0 adds noise ("churn") on sigmas within [s_tmin, s_tmax]."""

    def __init__(self, discretization_config: Mapping, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = float("inf"), s_noise: float = 1.0, **common):
        """``common``: num_steps, guider_config, verbose, device (BaseDiffusionSampler)."""
        super().__init__(discretization_config, **common)
        self.s_churn = s_churn
        self.s_tmin = s_tmin
        self.s_tmax = s_tmax
        self.s_noise = s_noise

    def sampler_step(self, sigma, next_sigma, denoiser, x, cond, uc=None, gamma=0.0, generator=None):
        sigma_hat = sigma * (gamma + 1.0)
        if gamma > 0:
            eps = randn_like(x, generator) * self.s_noise
            x = x + eps * append_dims(sigma_hat**2 - sigma**2, x.ndim) ** 0.5
        denoised = self.denoise(x, denoiser, sigma_hat, cond, uc)
        d = to_d(x, sigma_hat, denoised)
        dt = append_dims(next_sigma - sigma_hat, x.ndim)
        euler_step = self.euler_step(x, d, dt)
        return self.possible_correction_step(euler_step, x, d, dt, next_sigma, denoiser, cond, uc)

    def possible_correction_step(self, euler_step, x, d, dt, next_sigma, denoiser, cond, uc):
        return euler_step

    def __call__(self, denoiser: DenoiserFn, x: torch.Tensor, cond: Any, uc: Any = None,
                 num_steps: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        x, s_in, sigmas, num_sigmas, cond, uc = self.prepare_sampling_loop(x, cond, uc, num_steps)
        for i in self.get_sigma_gen(num_sigmas):
            in_churn_range = self.s_tmin <= float(sigmas[i]) <= self.s_tmax
            gamma = min(self.s_churn / (num_sigmas - 1), 2**0.5 - 1) if in_churn_range else 0.0
            x = self.sampler_step(s_in * sigmas[i], s_in * sigmas[i + 1], denoiser, x, cond, uc, gamma, generator)
        return self.finish(x, sigmas)


class EulerEDMSampler(EDMSampler):
    """First-order Euler steps on the probability-flow ODE (plus optional churn)."""


class HeunEDMSampler(EDMSampler):
    """Second order: averages the slopes at sigma and next_sigma; the final step to sigma = 0 stays Euler."""

    def possible_correction_step(self, euler_step, x, d, dt, next_sigma, denoiser, cond, uc):
        if torch.sum(next_sigma) < 1e-14:
            return euler_step  # the slope at sigma = 0 is undefined; every batch entry is at the last step
        denoised = self.denoise(euler_step, denoiser, next_sigma, cond, uc)
        d_new = to_d(euler_step, next_sigma, denoised)
        d_prime = (d + d_new) / 2.0
        return torch.where(append_dims(next_sigma, x.ndim) > 0.0, x + d_prime * dt, euler_step)


class AncestralSampler(SingleStepDiffusionSampler):
    """Deterministic step to sigma_down, then fresh noise of size sigma_up (eta = 0: plain Euler)."""

    def __init__(self, discretization_config: Mapping, eta: float = 1.0, s_noise: float = 1.0, **common):
        """``common``: num_steps, guider_config, verbose, device (BaseDiffusionSampler)."""
        super().__init__(discretization_config, **common)
        self.eta = eta
        self.s_noise = s_noise

    def ancestral_euler_step(self, x, denoised, sigma, sigma_down):
        d = to_d(x, sigma, denoised)
        dt = append_dims(sigma_down - sigma, x.ndim)
        return self.euler_step(x, d, dt)

    def ancestral_step(self, x, sigma, next_sigma, sigma_up, generator=None):
        if torch.all(next_sigma <= 0):
            return x  # the last step lands on the data; no noise to add
        noise = randn_like(x, generator) * self.s_noise * append_dims(sigma_up, x.ndim)
        return torch.where(append_dims(next_sigma, x.ndim) > 0.0, x + noise, x)

    def __call__(self, denoiser: DenoiserFn, x: torch.Tensor, cond: Any, uc: Any = None,
                 num_steps: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        x, s_in, sigmas, num_sigmas, cond, uc = self.prepare_sampling_loop(x, cond, uc, num_steps)
        for i in self.get_sigma_gen(num_sigmas):
            x = self.sampler_step(s_in * sigmas[i], s_in * sigmas[i + 1], denoiser, x, cond, uc, generator)
        return self.finish(x, sigmas)


class EulerAncestralSampler(AncestralSampler):
    def sampler_step(self, sigma, next_sigma, denoiser, x, cond, uc, generator=None):
        sigma_down, sigma_up = get_ancestral_step(sigma, next_sigma, eta=self.eta)
        denoised = self.denoise(x, denoiser, sigma, cond, uc)
        x = self.ancestral_euler_step(x, denoised, sigma, sigma_down)
        return self.ancestral_step(x, sigma, next_sigma, sigma_up, generator)


class DDIMSampler(EulerAncestralSampler):
    """DDIM (Song et al. 2021), any eta: with eta = 0 an Euler step of the probability-flow ODE in sigma, with
    eta > 0 an ancestral Euler step whose noise sigma_up is DDIM's sigma_t / sqrt(alpha_bar_prev) (the same
    formula as get_ancestral_step). With LeadingDDPMDiscretization it is the original sampler step for step."""

    def __init__(self, discretization_config: Mapping, eta: float = 0.0, **common):
        super().__init__(discretization_config, eta=eta, **common)


class PLMSSampler(BaseDiffusionSampler):
    """PLMS (Liu et al. 2022): Adams-Bashforth steps on the slope d = eps (orders 2, 3, 4 as history allows);
    the first step averages the slopes at both ends of an Euler step (two network calls). Deterministic."""

    COEFFICIENTS = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12],
                    4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}

    def slope(self, x, denoiser, sigma, cond, uc):
        return to_d(x, sigma, self.denoise(x, denoiser, sigma, cond, uc))

    def sampler_step(self, history, sigma, next_sigma, denoiser, x, cond, uc):
        d = self.slope(x, denoiser, sigma, cond, uc)
        dt = append_dims(next_sigma - sigma, x.ndim)
        if not history:
            d_next = self.slope(x + dt * d, denoiser, next_sigma, cond, uc)
            combined = (d + d_next) / 2
        else:
            slopes = [d, *reversed(history)]
            combined = sum(c * s for c, s in zip(self.COEFFICIENTS[len(slopes)], slopes))
        history.append(d)
        del history[:-3]
        return x + dt * combined

    def __call__(self, denoiser: DenoiserFn, x: torch.Tensor, cond: Any, uc: Any = None,
                 num_steps: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        # `generator` is accepted for a uniform interface; this sampler draws no noise.
        x, s_in, sigmas, num_sigmas, cond, uc = self.prepare_sampling_loop(x, cond, uc, num_steps)
        if float(sigmas[-1]) == 0.0 and num_sigmas == 2:
            raise ValueError("PLMS's first step evaluates the network at the next sigma: it cannot end at 0 in one "
                             "step; use a discretization that ends at a trained noise level or more steps")
        history: list[torch.Tensor] = []
        for i in self.get_sigma_gen(num_sigmas):
            x = self.sampler_step(history, s_in * sigmas[i], s_in * sigmas[i + 1], denoiser, x, cond, uc)
        return self.finish(x, sigmas)


class DPMPP2MSampler(BaseDiffusionSampler):
    """DPM-Solver++(2M): second-order multistep in log-sigma, reusing the previous x0 estimate."""

    def sampler_step(self, old_denoised, previous_sigma, sigma, next_sigma, denoiser, x, cond, uc=None):
        denoised = self.denoise(x, denoiser, sigma, cond, uc)
        ratio = append_dims(next_sigma / sigma, x.ndim)  # = exp(-h), h the step in -log sigma
        # First-order (DDIM-like) update; at next_sigma = 0 it returns the x0 estimate itself.
        x_standard = ratio * x + (1.0 - ratio) * denoised
        if old_denoised is None or torch.all(next_sigma <= 0):
            return x_standard, denoised
        safe_next = torch.where(next_sigma > 0, next_sigma, sigma)  # keeps logs finite where unused
        h = torch.log(sigma / safe_next)
        h_last = torch.log(previous_sigma / sigma)
        half_inv_r = append_dims(h / (2.0 * h_last), x.ndim)  # 1 / (2 r), r = h_last / h
        denoised_d = (1.0 + half_inv_r) * denoised - half_inv_r * old_denoised
        x_advanced = ratio * x + (1.0 - ratio) * denoised_d
        return torch.where(append_dims(next_sigma, x.ndim) > 0.0, x_advanced, x_standard), denoised

    def __call__(self, denoiser: DenoiserFn, x: torch.Tensor, cond: Any, uc: Any = None,
                 num_steps: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        # `generator` is accepted for a uniform interface; this sampler draws no noise.
        x, s_in, sigmas, num_sigmas, cond, uc = self.prepare_sampling_loop(x, cond, uc, num_steps)
        old_denoised = None
        for i in self.get_sigma_gen(num_sigmas):
            previous_sigma = None if i == 0 else s_in * sigmas[i - 1]
            x, old_denoised = self.sampler_step(
                old_denoised, previous_sigma, s_in * sigmas[i], s_in * sigmas[i + 1], denoiser, x, cond, uc
            )
        return self.finish(x, sigmas)
