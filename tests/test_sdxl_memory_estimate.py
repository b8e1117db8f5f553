"""scripts/sdxl_memory_estimate.py: the meta-device estimate and the measured step, on the tiny SD XL."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from scripts import sdxl_memory_estimate as script  # noqa: E402

TINY = ["configs/tiny/sdxl-tiny.yaml", "configs/tiny/perfusion-tiny.yaml", "configs/tiny/perfusion-sdxl-tiny.yaml"]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl_memory") / "perfusion-sdxl-tiny-merged.yaml"
    OmegaConf.save(OmegaConf.merge(*[OmegaConf.load(p) for p in TINY]), path)
    return str(path)


def test_estimate_counts_tiny_model(tiny_config):
    result = script.estimate(tiny_config)
    assert result["estimate"] is True
    assert all(n > 0 for n in result["parameters"].values())
    activations = result["activations_fp32_GiB"]
    assert 0 < activations["gradient_checkpointing"] < activations["no_checkpointing"]
    assert result["step_16mixed_checkpointing_GiB"] < result["step_16mixed_no_checkpointing_GiB"]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_measured_step_runs_and_reaches_the_trainable_values(tiny_config, checkpointing):
    result = script.measure(tiny_config, batch=1, device="cpu", checkpointing=checkpointing, repeats=1)
    assert result["seconds_per_step"] > 0
    assert result["context_grad_norm"] > 0 and torch.isfinite(torch.tensor(result["context_grad_norm"]))
    assert result["o_star_V_grad_norm"] > 0  # the edit is on: o*_V is reached
    assert "peak_GiB" not in result  # memory is measured on CUDA only


def test_measure_without_cuda_is_a_clear_error(tiny_config, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert script.main(["--config", tiny_config, "--measure", "cuda"]) == 2
    assert "needs CUDA" in capsys.readouterr().err
