"""sgm samplers/denoisers against an analytic diffusion model with a known exact answer.

Data x0 ~ N(mu, std^2) per channel, so for noisy x = x0 + sigma * eps the exact denoiser is
E[x0 | x] = mu + std^2 / (std^2 + sigma^2) * (x - mu), and the probability-flow ODE maps
x(sigma_max) to x(0) = mu + (x(sigma_max) - mu) * std / sqrt(std^2 + sigma_max^2).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sgm.modules.diffusionmodules.denoiser import Denoiser, DiscreteDenoiser
from sgm.modules.diffusionmodules.denoiser_scaling import EDMScaling, EpsScaling, VScaling
from sgm.modules.diffusionmodules.discretizer import EDMDiscretization, LegacyDDPMDiscretization
from sgm.modules.diffusionmodules.guiders import IdentityGuider, VanillaCFG
from sgm.modules.diffusionmodules.sampling import (
    DPMPP2MSampler,
    EulerAncestralSampler,
    EulerEDMSampler,
    HeunEDMSampler,
)
from sgm.sampling import build_sampler_and_denoiser, make_denoiser_fn
from ldm.util import ConfigError
from sgm.util import append_dims, instantiate_from_config


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These tensors are tiny: one thread avoids OpenMP overhead that dominates on a shared 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


ROOT = Path(__file__).resolve().parents[1]
PKG = "sgm.modules.diffusionmodules"
LEGACY = {"target": f"{PKG}.discretizer.LegacyDDPMDiscretization"}
EDM = {"target": f"{PKG}.discretizer.EDMDiscretization"}
EPS = {"target": f"{PKG}.denoiser_scaling.EpsScaling"}
V = {"target": f"{PKG}.denoiser_scaling.VScaling"}
EDM_SCALING = {"target": f"{PKG}.denoiser_scaling.EDMScaling"}
CFG = lambda scale: {"target": f"{PKG}.guiders.VanillaCFG", "params": {"scale": scale}}  # noqa: E731

MU = torch.tensor([1.5, -1.0, 0.5])
STD = torch.tensor([0.5, 1.0, 2.0])
CONTEXT_DIM = 8


def make_cond(mu: torch.Tensor, batch: int) -> torch.Tensor:
    """A (B, 77, D) 'text encoding' whose first token carries the data mean per channel."""
    cond = torch.zeros(batch, 77, CONTEXT_DIM)
    cond[:, 0, : mu.numel()] = mu
    return cond


class GaussianDataNetwork:
    """The exact eps- or v-prediction for x0 ~ N(mu, STD^2); mu is read from cond[:, 0, :C].

    time_input="index": t are DDPM timestep indices into alphas_cumprod (like LatentDiffusion.apply_model);
    time_input="sigma": t is the continuous sigma (abar = 1 / (1 + sigma^2)).
    """

    def __init__(self, parameterization="eps", time_input="index", std=STD):
        self.alphas_cumprod = torch.tensor(LegacyDDPMDiscretization().alphas_cumprod, dtype=torch.float64)
        self.parameterization = parameterization
        self.time_input = time_input
        self.var = (std**2).view(1, -1, 1, 1)
        self.batch_sizes = []
        self.time_inputs = []

    def __call__(self, x, t, cond):
        self.batch_sizes.append(x.shape[0])
        self.time_inputs.append(t.detach().clone())
        context = cond["crossattn"] if isinstance(cond, dict) else cond
        channels = x.shape[1]
        mu = context[:, 0, :channels].reshape(-1, channels, 1, 1).double()
        if self.time_input == "index":
            assert t.dtype == torch.long, "DiscreteDenoiser must hand the network integer timesteps"
            abar = self.alphas_cumprod[t]
        else:
            abar = 1.0 / (1.0 + t.double() ** 2)
        a, b = append_dims(abar.sqrt(), 4), append_dims((1 - abar).sqrt(), 4)
        z = x.double()
        x0_mean = mu + a * self.var / (a**2 * self.var + b**2) * (z - a * mu)
        eps = (z - a * x0_mean) / b
        out = eps if self.parameterization == "eps" else a * eps - b * x0_mean
        return out.to(x.dtype)


def exact_denoised(x, sigma, mu=MU, std=STD):
    var, mu = (std**2).view(1, -1, 1, 1), mu.view(1, -1, 1, 1)
    sigma = append_dims(sigma, x.ndim)
    return mu + var / (var + sigma**2) * (x - mu)


def exact_flow_endpoint(noise, sigma_max, mu=MU, std=STD):
    """ODE solution at sigma = 0 from the sampler's start x = noise * sqrt(1 + sigma_max^2)."""
    mu, std = mu.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
    x_start = noise * (1 + sigma_max**2) ** 0.5
    return mu + (x_start - mu) * std / (std**2 + sigma_max**2) ** 0.5


def discrete_denoiser(scaling=EPS):
    return DiscreteDenoiser(scaling_config=scaling, num_idx=1000, discretization_config=LEGACY)


def noise(batch, seed=0, hw=4):
    return torch.randn(batch, 3, hw, hw, generator=torch.Generator().manual_seed(seed))


def channel_stats(x):
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.std(1)


# ---------------------------------------------------------------- discretizations and denoisers


def test_legacy_discretization_is_the_sd_schedule():
    from diffusers import DDPMScheduler

    disc = LegacyDDPMDiscretization()
    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    torch.testing.assert_close(torch.tensor(disc.alphas_cumprod, dtype=torch.float32), reference, rtol=1e-6, atol=1e-7)

    sigmas = disc(50)
    assert sigmas.shape == (51,) and sigmas.dtype == torch.float32 and sigmas[-1] == 0
    assert torch.all(sigmas[:-1] > sigmas[1:])
    assert disc.timesteps(50).tolist() == list(range(19, 1000, 20))  # always ends at t = 999
    abar = torch.tensor(disc.alphas_cumprod[disc.timesteps(50)][::-1].copy())
    torch.testing.assert_close(sigmas[:-1].double(), ((1 - abar) / abar).sqrt(), rtol=1e-6, atol=0)
    assert sigmas[0].item() == pytest.approx(14.6146, abs=1e-3)  # SD's well-known sigma_max
    full = disc(1000, do_append_zero=False, flip=True)
    assert full.shape == (1000,) and full[0].item() == pytest.approx(0.029168, abs=1e-5)
    with pytest.raises(ValueError, match="1000 timesteps"):
        disc(1001)


def test_edm_discretization_endpoints_and_order():
    sigmas = EDMDiscretization(sigma_min=0.002, sigma_max=80.0, rho=7.0)(10)
    assert sigmas.shape == (11,) and sigmas[-1] == 0
    assert sigmas[0].item() == pytest.approx(80.0) and sigmas[-2].item() == pytest.approx(0.002)
    assert torch.all(sigmas[:-1] > sigmas[1:])
    # rho-spacing: sigma^(1/rho) is linear in the step index
    inv = sigmas[:-1].double() ** (1 / 7)
    torch.testing.assert_close(inv.diff(), inv.diff()[:1].expand(9), rtol=1e-5, atol=1e-7)


def test_discrete_denoiser_sigma_index_round_trip_is_exact():
    denoiser = discrete_denoiser()
    sigmas = LegacyDDPMDiscretization()(1000, do_append_zero=False, flip=True)
    idx = denoiser.sigma_to_idx(sigmas)
    assert idx.dtype == torch.long and torch.equal(idx, torch.arange(1000))
    assert torch.equal(denoiser.idx_to_sigma(idx), sigmas)
    # the sampler's subsampled sigmas are exact training sigmas, so quantization leaves them unchanged
    for n in (7, 50, 200):
        sampler_sigmas = LegacyDDPMDiscretization()(n)[:-1]
        assert torch.equal(denoiser.possibly_quantize_sigma(sampler_sigmas), sampler_sigmas)
        assert denoiser.sigma_to_idx(sampler_sigmas).flip(0).tolist() == LegacyDDPMDiscretization().timesteps(n).tolist()
    # an in-between sigma snaps to the nearer neighbour
    between = torch.stack([0.9 * sigmas[500] + 0.1 * sigmas[501], 0.1 * sigmas[500] + 0.9 * sigmas[501]])
    assert denoiser.sigma_to_idx(between).tolist() == [500, 501]


def test_denoiser_feeds_network_timestep_index_and_recovers_x0():
    network = GaussianDataNetwork("eps")
    denoiser = discrete_denoiser()
    sigmas = LegacyDDPMDiscretization()(1000, do_append_zero=False, flip=True)
    t = torch.tensor([0, 250, 999])
    x = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 3
    denoised = denoiser(network, x, sigmas[t], make_cond(MU, 3))
    assert torch.equal(network.time_inputs[-1], t)
    torch.testing.assert_close(denoised, exact_denoised(x, sigmas[t]).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sigma_value", [0.05, 1.0, 14.0])
def test_eps_and_v_scalings_give_the_same_x0(sigma_value):
    x = noise(4, seed=2) * (1 + sigma_value)
    sigma = torch.full((4,), sigma_value)
    cond = make_cond(MU, 4)
    from_eps = discrete_denoiser(EPS)(GaussianDataNetwork("eps"), x, sigma, cond)
    from_v = discrete_denoiser(V)(GaussianDataNetwork("v"), x, sigma, cond)
    torch.testing.assert_close(from_eps, from_v, rtol=1e-5, atol=1e-5)
    quantized = discrete_denoiser().possibly_quantize_sigma(sigma)
    torch.testing.assert_close(from_v, exact_denoised(x, quantized).float(), rtol=1e-5, atol=1e-5)
    # the wrong pairing is detectably wrong, so the agreement above means something
    mismatched = discrete_denoiser(EPS)(GaussianDataNetwork("v"), x, sigma, cond)
    assert (mismatched - from_eps).abs().max() > 1e-3


def test_edm_scaling_with_continuous_denoiser():
    sigma = torch.tensor([0.1, 1.0, 10.0])
    x = noise(3, seed=3) * 2
    cond = make_cond(MU, 3)
    scaling = EDMScaling(sigma_data=0.5)

    def edm_network(x_in, c_noise, cond):
        # F such that c_skip * x + c_out * F = exact x0; recover sigma from c_noise = log(sigma) / 4
        s = torch.exp(4 * c_noise)
        c_skip, c_out, c_in, _ = scaling(append_dims(s, 4))
        x_orig = x_in / c_in
        return (exact_denoised(x_orig, s) - c_skip * x_orig) / c_out

    denoised = Denoiser(EDM_SCALING)(edm_network, x, sigma, cond)
    torch.testing.assert_close(denoised, exact_denoised(x, sigma), rtol=1e-4, atol=1e-4)
    c_skip, c_out, c_in, c_noise = scaling(torch.tensor(0.5))
    assert (c_skip.item(), c_in.item(), c_noise.item()) == pytest.approx((0.5, 2**0.5, 0.25 * torch.log(torch.tensor(0.5)).item()))


# ---------------------------------------------------------------- samplers


DETERMINISTIC = [EulerEDMSampler, HeunEDMSampler, DPMPP2MSampler]


@pytest.mark.parametrize("sampler_cls", DETERMINISTIC)
def test_deterministic_samplers_follow_the_probability_flow(sampler_cls):
    batch = 2048
    sampler = sampler_cls(discretization_config=LEGACY, num_steps=200, guider_config=CFG(6.0))
    x_t = noise(batch, seed=4, hw=2)
    cond = make_cond(MU, batch)
    denoise = make_denoiser_fn(discrete_denoiser(), GaussianDataNetwork("eps"))
    samples = sampler(denoise, x_t, cond, uc=cond)  # uc == cond: guidance changes nothing
    assert samples.shape == x_t.shape and samples.dtype == torch.float32 and torch.isfinite(samples).all()

    sigma_max = LegacyDDPMDiscretization()(200)[0].double()
    expected = exact_flow_endpoint(x_t.double(), sigma_max)
    assert (samples.double() - expected).abs().max() < 0.05
    mean, std = channel_stats(samples)
    # the data distribution, up to SD's finite sigma_max (mean bias mu * std / sigma_max) and sampling noise
    assert torch.allclose(mean, MU, atol=0.15), mean
    assert torch.allclose(std, STD, rtol=0.05), std


def test_euler_ancestral_matches_data_distribution_and_is_reproducible():
    batch = 2048
    sampler = EulerAncestralSampler(discretization_config=LEGACY, num_steps=200, eta=1.0)
    cond = make_cond(MU, batch)
    denoise = make_denoiser_fn(discrete_denoiser(), GaussianDataNetwork("eps"))
    x_t = noise(batch, seed=5, hw=2)
    samples = sampler(denoise, x_t, cond, generator=torch.Generator().manual_seed(7))
    assert samples.shape == x_t.shape and torch.isfinite(samples).all()
    mean, std = channel_stats(samples)
    assert torch.allclose(mean, MU, atol=0.1), mean
    assert torch.allclose(std, STD, rtol=0.05), std

    small = x_t[:8]
    run = lambda seed: sampler(denoise, small, cond[:8], num_steps=20, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(7), run(7))
    assert (run(7) - run(8)).abs().max() > 1e-2
    # eta = 0 removes the noise: the ancestral sampler becomes plain Euler
    eta0 = EulerAncestralSampler(discretization_config=LEGACY, num_steps=20, eta=0.0)
    euler = EulerEDMSampler(discretization_config=LEGACY, num_steps=20)
    torch.testing.assert_close(eta0(denoise, small, cond[:8]), euler(denoise, small, cond[:8]))


def test_euler_churn_uses_the_generator():
    cond = make_cond(MU, 8)
    denoise = make_denoiser_fn(discrete_denoiser(), GaussianDataNetwork("eps"))
    x_t = noise(8, seed=6)
    churned = EulerEDMSampler(discretization_config=LEGACY, num_steps=20, s_churn=2.0)
    run = lambda seed: churned(denoise, x_t, cond, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(1), run(1))
    assert (run(1) - run(2)).abs().max() > 1e-3
    plain = EulerEDMSampler(discretization_config=LEGACY, num_steps=20)(denoise, x_t, cond)
    assert (run(1) - plain).abs().max() > 1e-3
    # churn confined to sigmas above every scheduled sigma is a no-op
    outside = EulerEDMSampler(discretization_config=LEGACY, num_steps=20, s_churn=2.0, s_tmin=100.0)
    assert torch.equal(outside(denoise, x_t, cond, generator=torch.Generator().manual_seed(1)), plain)


def test_sampler_does_not_modify_the_callers_noise():
    x_t = noise(4, seed=9)
    before = x_t.clone()
    denoise = make_denoiser_fn(discrete_denoiser(), GaussianDataNetwork("eps"))
    EulerEDMSampler(discretization_config=LEGACY, num_steps=5)(denoise, x_t, make_cond(MU, 4))
    assert torch.equal(x_t, before)


# ---------------------------------------------------------------- guidance


UNCOND_MU = torch.tensor([-2.0, 0.0, 3.0])


@pytest.mark.parametrize("sampler_cls", [EulerEDMSampler, DPMPP2MSampler])
def test_cfg_scale_one_equals_conditional_sampling(sampler_cls):
    batch = 6
    cond, uc = make_cond(MU, batch), make_cond(UNCOND_MU, batch)
    denoise = make_denoiser_fn(discrete_denoiser(), GaussianDataNetwork("eps"))
    x_t = noise(batch, seed=10)
    conditional = sampler_cls(discretization_config=LEGACY, num_steps=25)(denoise, x_t, cond)
    guided = sampler_cls(discretization_config=LEGACY, num_steps=25, guider_config=CFG(1.0))(denoise, x_t, cond, uc)
    torch.testing.assert_close(guided, conditional, rtol=1e-5, atol=1e-5)
    unconditional = sampler_cls(discretization_config=LEGACY, num_steps=25)(denoise, x_t, uc)
    assert (conditional - unconditional).abs().max() > 0.5  # uc really differs from cond


def test_cfg_with_equal_cond_and_uncond_ignores_scale_and_batches_once_per_step():
    batch, steps = 5, 12
    cond = make_cond(MU, batch)
    network = GaussianDataNetwork("eps")
    denoise = make_denoiser_fn(discrete_denoiser(), network)
    x_t = noise(batch, seed=11)
    reference = EulerEDMSampler(discretization_config=LEGACY, num_steps=steps)(denoise, x_t, cond)
    network.batch_sizes.clear()
    for scale in (0.0, 3.0, 7.5):
        out = EulerEDMSampler(discretization_config=LEGACY, num_steps=steps, guider_config=CFG(scale))(
            denoise, x_t, cond, cond.clone()
        )
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
        assert network.batch_sizes == [2 * batch] * steps
        network.batch_sizes.clear()


def test_cfg_combines_uncond_and_cond_predictions_and_accepts_dict_cond():
    batch = 3
    cond, uc = make_cond(MU, batch), make_cond(UNCOND_MU, batch)
    network = GaussianDataNetwork("eps")
    denoise = make_denoiser_fn(discrete_denoiser(), network)
    x = noise(batch, seed=12) * 5
    sigma = torch.full((batch,), 4.0)
    sampler = EulerEDMSampler(discretization_config=LEGACY, num_steps=1, guider_config=CFG(7.5))
    guided = sampler.denoise(x, denoise, sigma, cond, uc)
    d_c, d_u = denoise(x, sigma, cond), denoise(x, sigma, uc)
    torch.testing.assert_close(guided, d_u + 7.5 * (d_c - d_u), rtol=1e-5, atol=1e-5)

    as_dict = sampler.denoise(x, denoise, sigma, {"crossattn": cond, "flag": True}, {"crossattn": uc, "flag": True})
    torch.testing.assert_close(as_dict, guided)
    # ldm-style {"c_crossattn": [tensor]} nests a list; it is batched the same way
    x_in, s_in, c_in = VanillaCFG(2.0).prepare_inputs(x, sigma, {"c_crossattn": [cond]}, {"c_crossattn": [uc]})
    assert x_in.shape[0] == s_in.shape[0] == c_in["c_crossattn"][0].shape[0] == 2 * batch
    assert torch.equal(c_in["c_crossattn"][0][:batch], uc)  # uncond first, as the guider's chunk expects
    with pytest.raises(ValueError, match="uncond keys"):
        VanillaCFG(2.0).prepare_inputs(x, sigma, {"crossattn": cond}, {"other": uc})
    with pytest.raises(ValueError, match="must be equal"):
        VanillaCFG(2.0).prepare_inputs(x, sigma, {"crossattn": cond, "flag": True}, {"crossattn": uc, "flag": False})
    assert IdentityGuider().prepare_inputs(x, sigma, cond, uc)[2] is cond


# ---------------------------------------------------------------- order of accuracy


def _final_error(sampler_cls, num_steps, reference, x_t, cond, denoise, discretization):
    out = sampler_cls(discretization_config=discretization, num_steps=num_steps)(denoise, x_t, cond)
    return (out.double() - reference).pow(2).mean().sqrt().item()


def test_heun_is_second_order_and_beats_euler():
    batch = 64
    cond = make_cond(MU, batch)
    x_t = noise(batch, seed=13)

    # Legacy SD schedule with the discrete denoiser, against a 1000-step Euler reference.
    denoise = make_denoiser_fn(discrete_denoiser(), GaussianDataNetwork("eps"))
    reference = EulerEDMSampler(discretization_config=LEGACY, num_steps=1000)(denoise, x_t, cond).double()
    euler_err = _final_error(EulerEDMSampler, 10, reference, x_t, cond, denoise, LEGACY)
    heun_err = _final_error(HeunEDMSampler, 10, reference, x_t, cond, denoise, LEGACY)
    assert heun_err < 0.5 * euler_err, (heun_err, euler_err)

    # Continuous sigmas (Karras schedule): compare with the exact ODE solution and measure the order.
    denoise = make_denoiser_fn(Denoiser(EPS), GaussianDataNetwork("eps", time_input="sigma"))
    exact = exact_flow_endpoint(x_t.double(), torch.tensor(80.0, dtype=torch.float64))
    euler_20, euler_40 = (_final_error(EulerEDMSampler, n, exact, x_t, cond, denoise, EDM) for n in (20, 40))
    heun_20, heun_40 = (_final_error(HeunEDMSampler, n, exact, x_t, cond, denoise, EDM) for n in (20, 40))
    dpm_20, dpm_40 = (_final_error(DPMPP2MSampler, n, exact, x_t, cond, denoise, EDM) for n in (20, 40))
    assert heun_20 < 0.4 * euler_20 and dpm_20 < 0.4 * euler_20, (heun_20, dpm_20, euler_20)
    assert 1.7 < euler_20 / euler_40 < 2.3, (euler_20, euler_40)  # first order: error halves
    assert heun_20 / heun_40 > 3.5 and dpm_20 / dpm_40 > 3.5, (heun_20, heun_40, dpm_20, dpm_40)  # second order


# ---------------------------------------------------------------- configs


def test_yaml_configs_build_working_sampler_and_denoiser():
    sampler_cfg = OmegaConf.load(ROOT / "configs/sampler/sampler.yaml")
    denoiser_cfg = OmegaConf.load(ROOT / "configs/denoiser/denoiser.yaml")
    sampler, denoiser = instantiate_from_config(sampler_cfg), instantiate_from_config(denoiser_cfg)
    assert type(sampler) is EulerEDMSampler and sampler.num_steps == 50
    assert isinstance(sampler.discretization, LegacyDDPMDiscretization)
    assert isinstance(sampler.guider, VanillaCFG) and sampler.guider.scale == 6.0
    assert isinstance(denoiser, DiscreteDenoiser) and isinstance(denoiser.scaling, EpsScaling)
    assert denoiser.sigmas.shape == (1000,)

    batch = 4
    network = GaussianDataNetwork("eps")
    cond, uc = make_cond(MU, batch), make_cond(UNCOND_MU, batch)
    x_t = noise(batch, seed=14)
    samples = sampler(make_denoiser_fn(denoiser, network), x_t, cond, uc, num_steps=8)
    assert samples.shape == x_t.shape and torch.isfinite(samples).all()
    assert network.batch_sizes == [2 * batch] * 8
    # scale 6 pushes the samples past the conditional mean, away from the unconditional one
    mean = samples.mean(dim=(0, 2, 3))
    assert torch.all((mean - MU) * (MU - UNCOND_MU) > 0), mean


def test_build_sampler_and_denoiser_overrides_and_errors():
    sampler_path, denoiser_path = ROOT / "configs/sampler/sampler.yaml", ROOT / "configs/denoiser/denoiser.yaml"
    with pytest.warns(UserWarning, match="VScaling"):
        sampler, denoiser = build_sampler_and_denoiser(
            sampler_path, denoiser_path, parameterization="v", num_steps=12, guidance_scale=2.5, verbose=False
        )
    assert isinstance(denoiser.scaling, VScaling) and sampler.num_steps == 12 and sampler.guider.scale == 2.5
    # the swapped scaling is right for a v-model: same samples as the eps-model with EpsScaling
    cond = make_cond(MU, 4)
    x_t = noise(4, seed=15)
    from_v = sampler(make_denoiser_fn(denoiser, GaussianDataNetwork("v")), x_t, cond)
    eps_sampler, eps_denoiser = build_sampler_and_denoiser(sampler_path, denoiser_path, parameterization="eps",
                                                           num_steps=12, guidance_scale=2.5, verbose=False)
    from_eps = eps_sampler(make_denoiser_fn(eps_denoiser, GaussianDataNetwork("eps")), x_t, cond)
    torch.testing.assert_close(from_v, from_eps, rtol=1e-4, atol=1e-4)

    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        build_sampler_and_denoiser(ROOT / "missing.yaml", denoiser_path)
    with pytest.raises(ValueError, match="parameterization"):
        build_sampler_and_denoiser(sampler_path, denoiser_path, parameterization="x0")
    with pytest.raises(ConfigError, match="no .target. key"):
        instantiate_from_config({"params": {}})
    with pytest.raises(ValueError, match="num_steps"):
        EulerEDMSampler(discretization_config=LEGACY)(lambda x, s, c: x, noise(1), make_cond(MU, 1))
