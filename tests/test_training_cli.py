"""`python main.py ... -t` on the tiny world, in subprocesses: outputs, concept files, resume, DDP, bad inputs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from perfusion.concept_file import load_concept

REPO = Path(__file__).resolve().parent.parent
TINY_BASES = ["configs/tiny/sd1-tiny.yaml", "configs/tiny/perfusion-tiny.yaml"]


def run_main(args, cwd=REPO, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    return result


def only_logdir(basedir: Path) -> Path:
    dirs = [d for d in basedir.iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.fixture(scope="module")
def training_run(tiny_world, tmp_path_factory):
    basedir = tmp_path_factory.mktemp("runs")
    result = run_main(["--name", "toy", "--base", *TINY_BASES, "--basedir", str(basedir), "-t", "True",
                       *tiny_world.cli_overrides()])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return basedir, only_logdir(basedir), result


def test_training_writes_events_images_checkpoints_and_concepts(training_run):
    basedir, logdir, result = training_run
    assert list((logdir / "tensorboard").glob("events.out.tfevents.*"))
    images = {p.name.split("_gs-")[0] for p in (logdir / "images" / "train").glob("*.png")}
    assert {"inputs", "reconstruction", "mask", "samples", "samples_scale6"} <= images
    assert (logdir / "checkpoints" / "last.ckpt").is_file()
    # Lightning checkpoints hold the concept state only, not the frozen base model.
    state = torch.load(logdir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 4
    assert all(("target_output" in k) or k.startswith("embedding_manager") or k in
               ("target_input", "superclass_input", "targets_initialized") for k in state["state_dict"])
    assert {"step000002", "step000004"} <= {p.stem.split("-")[-1] for p in (logdir / "concepts").glob("toy-*.safetensors")}
    final = basedir / "toy.safetensors"
    concept = load_concept(final)
    assert concept.metadata["training_steps"] == 4
    assert os.path.getsize(final) < 8 * 1024
    assert len(list((logdir / "configs").glob("*-project.yaml"))) == 1
    # the progress bar counts optimizer steps toward max_steps
    assert "optimizer steps" in result.stderr and "4/4" in result.stderr


def test_tensorboard_has_the_loss_scalars(training_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, logdir, _ = training_run
    events = EventAccumulator(str(logdir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_simple", "train/embedding_norm"} <= tags
    assert len(events.Scalars("train/loss")) == 4
    # validation prompts (configs/tiny/perfusion-tiny.yaml: every 2 steps): one grid per log, on disk too
    assert [e.step for e in events.Images("validation/grid")] == [2, 4]


def test_validation_grids_are_written_at_the_configured_steps_and_change_with_training(training_run):
    import numpy as np
    from PIL import Image

    _, logdir, _ = training_run
    grids = sorted((logdir / "images" / "validation").glob("step-*.png"))
    assert [p.name for p in grids] == ["step-000002.png", "step-000004.png"]
    first, last = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in grids)
    # 3 prompts (rows) x 2 betas (columns) of 32-px tiles under a 20-px header, 220-px label column
    assert first.shape == (20 + 3 * 36, 220 + 2 * 36, 3)
    tiles = first[20:, 220:]
    assert tiles.std() > 5  # pictures, not a blank sheet
    assert np.abs(first - last).max() > 0  # same noise, two steps of training apart


def test_resume_continues_the_step_count_and_remembers_where_the_run_belongs(training_run, tmp_path):
    basedir, logdir, _ = training_run
    # no --basedir, and started from another folder: the run still writes its final concept beside its log folder
    result = run_main(["-r", str(logdir), "-t", "True", "lightning.trainer.max_steps=6"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = torch.load(logdir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 6
    assert load_concept(logdir / "concepts" / "toy.safetensors").metadata["training_steps"] == 6
    assert load_concept(basedir / "toy.safetensors").metadata["training_steps"] == 6
    assert not (tmp_path / "logs").exists()
    assert "5/6" in result.stderr or "6/6" in result.stderr
    # a --basedir that contradicts the run is refused rather than half-followed
    other = run_main(["-r", str(logdir), "-t", "True", "--basedir", str(tmp_path)])
    assert other.returncode == 2 and "drop --basedir" in other.stderr


def test_resume_from_an_older_step_keeps_the_newer_outputs_and_says_so(training_run):
    basedir, logdir, _ = training_run
    older = logdir / "checkpoints" / "step000002.ckpt"
    newest = torch.load(logdir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    final_before = (basedir / "toy.safetensors").read_bytes()
    result = run_main(["-r", str(older), "-t", "True", f"lightning.trainer.max_steps={newest + 1}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "older than last.ckpt" in result.stderr
    kept = list((logdir / "checkpoints").glob("last-before-resume-*.ckpt"))
    assert len(kept) == 1
    assert torch.load(kept[0], map_location="cpu", weights_only=False)["global_step"] == newest
    kept_concepts = list(basedir.glob("toy-before-resume-*.safetensors"))
    assert len(kept_concepts) == 1 and kept_concepts[0].read_bytes() == final_before


def test_two_process_cpu_ddp_ends_with_identical_concepts_on_both_ranks(tiny_world, tmp_path):
    result = run_main(["--name", "ddp", "--base", *TINY_BASES, "--basedir", str(tmp_path), "-t", "True",
                       *tiny_world.cli_overrides(), "lightning.trainer.devices=2", "lightning.trainer.strategy=ddp",
                       "lightning.trainer.max_steps=2", "lightning.callbacks.image_logger.params.batch_frequency=100"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((only_logdir(tmp_path) / "concepts" / "rank_agreement.json").read_text())
    assert report["world_size"] == 2 and report["numel"] > 300
    assert report["max_abs_difference"] == 0.0


def test_training_with_gradient_checkpointing_as_the_real_configs_do(tiny_world, tmp_path):
    """``use_checkpoint: True`` in the UNet config (as configs/perfusion_*.yaml set it): the optimizer steps run,
    the concept moves away from its initial state (embedding = the super-class word's, o*_V = W_V i_super), and the
    file reloads into an inference model, where it changes the prediction."""
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config
    from perfusion.roe import edited_layers

    result = run_main(["--name", "gc", "--base", *TINY_BASES, "--basedir", str(tmp_path), "-t", "True",
                       *tiny_world.cli_overrides(), "model.params.unet_config.params.use_checkpoint=True",
                       "lightning.trainer.max_steps=2", "lightning.callbacks.image_logger.params.batch_frequency=100"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logdir = only_logdir(tmp_path)
    project = OmegaConf.load(next((logdir / "configs").glob("*-project.yaml")))
    assert project.model.params.unet_config.params.use_checkpoint is True
    assert "2/2" in result.stderr
    concept = load_concept(tmp_path / "gc.safetensors")
    assert concept.metadata["training_steps"] == 2

    model = instantiate_from_config(OmegaConf.load("configs/tiny/perfusion-inference-sd1-tiny.yaml").model)
    model.init_from_ckpt(str(tiny_world.ckpt))
    model.eval()
    teddy = model.cond_stage_model.tokenize(["teddy"])[0, 1]
    initial_embedding = model.cond_stage_model.token_embedding.weight[teddy]
    assert (concept.embedding - initial_embedding).abs().max() > 1e-3
    values = edited_layers(model.model.diffusion_model, "value")
    with torch.no_grad():
        moved = [float((concept.value_outputs[name] - layer.weight @ concept.superclass_input).abs().max())
                 for name, layer in values.items()]
    assert len(moved) == 7 and min(moved) > 1e-3, moved

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.no_grad():
        plain = model.apply_model(x, t, model.get_learned_conditioning(["a photo of a teddy"]))
        model.load_concepts([tmp_path / "gc.safetensors"])
        for name, layer in values.items():
            torch.testing.assert_close(layer.target_output[0], concept.value_outputs[name], rtol=0, atol=0)
        personalized = model.apply_model(x, t, model.get_learned_conditioning(["a photo of a *"]))
    assert torch.isfinite(personalized).all() and (personalized - plain).abs().max() > 1e-4


@pytest.mark.parametrize("key, filename, messages", [
    ("ckpt_path", "v1-5-pruned-emaonly.ckpt", ["base checkpoint not found", "huggingface.co"]),
    ("C_inv_path", "C_inv.npy", ["C^-1 file not found", "data/estimate_C_inv.py"]),
])
def test_missing_weights_say_where_to_get_them(tiny_world, tmp_path, key, filename, messages):
    overrides = [o for o in tiny_world.cli_overrides() if key not in o]
    result = run_main(["--base", *TINY_BASES, "--basedir", str(tmp_path), "-t", "True", *overrides,
                       f"model.params.{key}={tmp_path / filename}"])
    assert result.returncode != 0
    assert all(message in result.stderr for message in messages), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
