"""DDIM and PLMS as sgm samplers equal the original (CompVis) update rules, written out here as small references,
and diffusers' DDIMScheduler (eta 0 and 1) and PNDMScheduler (skip_prk_steps), on tiny models of both families."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers
import numpy as np
import pytest
import torch

from tests._tiny_models import TINY_CONFIGS, build_tiny_model, write_tiny_checkpoint
from sgm.modules.diffusionmodules.discretizer import LeadingDDPMDiscretization
from sgm.sampling import sample

TOL = 1e-5


# ----- the original update rules, step by step ------------------------------------------------------------------
def leading_timesteps(steps: int, num_timesteps: int = 1000) -> np.ndarray:
    return np.arange(0, num_timesteps, num_timesteps // steps)[:steps] + 1


def guided_eps(model, x, t, c, uc, scale):
    out_u, out_c = model.apply_model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uc, c])).chunk(2)
    out = out_u + scale * (out_c - out_u)
    return model.predict_eps_from_z_and_v(x, t, out) if model.parameterization == "v" else out


def compvis_schedule(model, steps, eta):
    timesteps = leading_timesteps(steps, model.num_timesteps)
    alphas_cumprod = model.alphas_cumprod.double()
    a = alphas_cumprod[timesteps]
    a_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[timesteps[:-1]]])
    sigma = eta * torch.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    return timesteps, a.float(), a_prev.float(), sigma.float()


def compvis_ddim_step(x, e, a, a_prev, sigma, generator):
    pred_x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
    x_prev = a_prev.sqrt() * pred_x0 + (1 - a_prev - sigma**2).sqrt() * e
    if sigma > 0:
        x_prev = x_prev + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x_prev


def compvis_ddim(model, c, uc, x, steps, scale, eta=0.0, generator=None):
    timesteps, a, a_prev, sigma = compvis_schedule(model, steps, eta)
    for index in reversed(range(steps)):
        t = torch.full((x.shape[0],), int(timesteps[index]), dtype=torch.long)
        e = guided_eps(model, x, t, c, uc, scale)
        x = compvis_ddim_step(x, e, a[index], a_prev[index], sigma[index], generator)
    return x


def compvis_plms(model, c, uc, x, steps, scale):
    timesteps, a, a_prev, sigma = compvis_schedule(model, steps, 0.0)
    old = []
    for index in reversed(range(steps)):
        t = torch.full((x.shape[0],), int(timesteps[index]), dtype=torch.long)
        e = guided_eps(model, x, t, c, uc, scale)
        if not old:
            x_next = compvis_ddim_step(x, e, a[index], a_prev[index], sigma[index], None)
            t_next = torch.full_like(t, int(timesteps[max(index - 1, 0)]))
            e_prime = (e + guided_eps(model, x_next, t_next, c, uc, scale)) / 2
        elif len(old) == 1:
            e_prime = (3 * e - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        old = (old + [e])[-3:]
        x = compvis_ddim_step(x, e_prime, a[index], a_prev[index], sigma[index], None)
    return x


# ----- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["sd1", "sd2"])
def tiny(request):
    """A tiny model (sd1: eps, sd2: v-prediction) in float64, so that a difference between two update rules is not
    hidden in float32 rounding (the random model's samples reach magnitudes of 20); conditioning and start noise."""
    model = build_tiny_model(request.param, seed=3).double()
    with torch.no_grad():
        c = model.get_learned_conditioning(["a photo of a teddy", "a red car"])
        uc = model.get_learned_conditioning(["", ""])
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    return model, c, uc, x_T


def _max_diff(a, b):
    return (a - b).abs().max().item()


# ----- against the written-out originals ---------------------------------------------------------------------------
def test_leading_discretization_is_the_original_timesteps_ending_at_alpha_bar_zero():
    schedule = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)
    discretization = LeadingDDPMDiscretization(alphas_cumprod=schedule)
    assert list(discretization.timesteps(10)) == list(range(1, 1000, 100))
    sigmas = discretization(10)
    steps = list(range(901, 0, -100))
    expected = np.sqrt((1 - schedule[steps]) / schedule[steps])
    np.testing.assert_allclose(sigmas[:-1].numpy(), expected, rtol=1e-6)
    assert sigmas[-1].item() == pytest.approx(np.sqrt((1 - schedule[0]) / schedule[0]), rel=1e-6) and sigmas[-1] > 0
    with pytest.raises(ValueError, match="between 1 and 999"):
        discretization(1000)


@torch.no_grad()
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_equals_the_original_update_rule(tiny, eta):
    model, c, uc, x_T = tiny
    expected = compvis_ddim(model, c, uc, x_T.clone(), 10, 5.0, eta, torch.Generator().manual_seed(5))
    got = sample(model, c, x_T.clone(), uc, steps=10, scale=5.0, eta=eta, generator=torch.Generator().manual_seed(5))
    assert _max_diff(expected, x_T) > 0.1
    assert _max_diff(got, expected) <= TOL


@torch.no_grad()
def test_plms_equals_the_original_update_rule(tiny):
    model, c, uc, x_T = tiny
    expected = compvis_plms(model, c, uc, x_T.clone(), 8, 5.0)
    got = sample(model, c, x_T.clone(), uc, name="plms", steps=8, scale=5.0)
    assert _max_diff(got, expected) <= TOL
    assert _max_diff(got, sample(model, c, x_T.clone(), uc, steps=8, scale=5.0)) > 1e-3  # not DDIM
    with pytest.raises(ValueError, match="eta"):
        sample(model, c, x_T, uc, name="plms", steps=8, eta=0.5)


@torch.no_grad()
def test_guidance_is_one_batched_call_per_evaluation_and_none_at_scale_one(tiny):
    model, c, uc, x_T = tiny
    calls = []
    original = model.apply_model
    model.apply_model = lambda x, t, cond: (calls.append(x.shape[0]), original(x, t, cond))[1]
    try:
        a = sample(model, c, x_T, uc, steps=5, scale=5.0)
        assert calls == [4] * 5
        calls.clear()
        sample(model, c, x_T, uc, name="plms", steps=5, scale=5.0)
        assert calls == [4] * 6  # the first PLMS step evaluates both ends of an Euler step
        calls.clear()
        unguided = sample(model, c, x_T, uc, steps=5, scale=1.0)
        assert calls == [2] * 5
    finally:
        model.apply_model = original
    torch.testing.assert_close(a, sample(model, c, x_T, uc, steps=5, scale=5.0), rtol=0, atol=0)
    torch.testing.assert_close(unguided, compvis_ddim(model, c, c, x_T, 5, 1.0), rtol=0, atol=TOL)


# ----- against diffusers ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["sd1", "sd2"])
def converted(request, tmp_path_factory):
    family = request.param
    path = tmp_path_factory.mktemp(family) / "tiny.safetensors"
    ours = write_tiny_checkpoint(path, family, seed=7)
    unet = diffusers.UNet2DConditionModel.from_single_file(str(path), original_config=str(TINY_CONFIGS[family]))
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(2, 77, 32, generator=g), torch.randn(2, 77, 32, generator=g)
    return ours, unet.eval(), cond, uncond, torch.randn(2, 4, 8, 8, generator=g)


def diffusers_loop(scheduler, unet, cond, uncond, x, scale, steps, v_to_eps=False, **step_kwargs):
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        out_u, out_c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        out = out_u + scale * (out_c - out_u)
        if v_to_eps:  # eps = sqrt(alpha_bar) v + sqrt(1 - alpha_bar) x
            alpha_bar = scheduler.alphas_cumprod[t]
            out = alpha_bar.sqrt() * out + (1 - alpha_bar).sqrt() * x
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                steps_offset=1, timestep_spacing="leading")


@torch.no_grad()
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_equals_diffusers_ddim_scheduler(converted, eta):
    ours, unet, cond, uncond, x_T = converted
    prediction = "v_prediction" if ours.parameterization == "v" else "epsilon"
    scheduler = diffusers.DDIMScheduler(clip_sample=False, prediction_type=prediction, **SCHEDULE)
    expected = diffusers_loop(scheduler, unet, cond, uncond, x_T.clone(), 5.0, 10, eta=eta,
                              generator=torch.Generator().manual_seed(9))
    got = sample(ours, cond, x_T.clone(), uncond, steps=10, scale=5.0, eta=eta,
                 generator=torch.Generator().manual_seed(9))
    assert _max_diff(expected, x_T) > 0.1
    assert _max_diff(got, expected) <= 1e-4


@torch.no_grad()
def test_plms_equals_diffusers_pndm_scheduler(converted):
    """PLMS combines noise estimates. diffusers' PNDM combines raw model outputs, which for a v-model are v
    predictions, a different method; so a v-model's output is turned into eps before the scheduler sees it."""
    ours, unet, cond, uncond, x_T = converted
    scheduler = diffusers.PNDMScheduler(skip_prk_steps=True, prediction_type="epsilon", **SCHEDULE)
    expected = diffusers_loop(scheduler, unet, cond, uncond, x_T.clone(), 5.0, 10,
                              v_to_eps=ours.parameterization == "v")
    got = sample(ours, cond, x_T.clone(), uncond, name="plms", steps=10, scale=5.0)
    assert _max_diff(expected, x_T) > 0.1
    assert _max_diff(got, expected) <= 1e-4
