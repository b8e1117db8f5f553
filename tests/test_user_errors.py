"""Every user error is a short message naming the file or value and the fix, exit code 2, nothing half-made.

The command lines run in subprocesses on the shipped toy model (small, so each failing start takes seconds).
"""
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.util import (BadValueError, CheckpointError, ConfigError, MissingFileError, instantiate_from_config,
                      load_state_dict, validate_config)
from tests._cli import REPO, assert_user_error, run_cli

STAR = "configs/toy/perfusion_star.yaml"
TOY_CONFIG = "configs/toy/inference.yaml"
TOY_BASE = "ckpt/toy/base.safetensors"
TOY_CONCEPT = "ckpt/toy/toy_dots.safetensors"


# ----- configs ---------------------------------------------------------------------------------------------------
def test_every_shipped_config_passes_the_strict_check():
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(configs) >= 15
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the SD configs carry keys we deliberately leave unused
        for path in configs:
            config = OmegaConf.load(path)
            config.pop("lightning", None)
            validate_config(config, path.name)


def test_image_logger_needs_no_target_and_an_old_one_is_ignored():
    """main.py builds the image logger from its params; old configs name main.ImageLogger as its target."""
    from main import check_lightning_config

    params = {"batch_frequency": 5}
    check_lightning_config(OmegaConf.create({"callbacks": {"image_logger": {"params": params}}}))
    check_lightning_config(OmegaConf.create({"callbacks": {"image_logger": {"target": "main.ImageLogger",
                                                                             "params": params}}}))
    with pytest.raises(ConfigError, match="'param'"):
        check_lightning_config(OmegaConf.create({"callbacks": {"image_logger": {"param": params}}}))


def test_unknown_key_names_the_closest_known_one():
    config = OmegaConf.load(STAR)
    config.model.params.parameterisation = "v"
    with pytest.raises(ConfigError, match="unknown config key 'parameterisation'; did you mean 'parameterization'"):
        validate_config(config.model, "model")
    dataset = {"target": "perfusion.dataset.PersonalizedBase",
               "params": {"data_root": "training_data/toy_star", "size": 32, "flip": 0.5}}
    with pytest.raises(ConfigError, match="unknown config key 'flip'; did you mean 'flip_p'"):
        instantiate_from_config(dataset)


def test_unused_keys_of_the_original_configs_warn_once_with_the_reason():
    import ldm.util

    ldm.util._warned_unused.clear()  # other tests may have met these keys already
    config = {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
        "embed_dim": 4, "monitor": "val/rec_loss", "lossconfig": {"target": "torch.nn.Identity"},
        "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
                     "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}
    with pytest.warns(UserWarning, match="'lossconfig' is accepted but not used: the VAE is used frozen"):
        model = instantiate_from_config(config)
    assert model.embed_dim == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second build does not repeat the warning
        instantiate_from_config(config)
    config["params"]["ddconfig"]["z_channel"] = 4
    with pytest.raises(ConfigError, match="'z_channel'; did you mean 'z_channels'"):
        instantiate_from_config(config)


@pytest.fixture()
def star_data(tmp_path):
    """A copy of the toy_star training images that a test may damage."""
    root = tmp_path / "toy_star"
    shutil.copytree(REPO / "training_data" / "toy_star", root)
    return root


def train_star(tmp_path, *overrides):
    basedir = tmp_path / "runs"
    result = run_cli("main.py", "--base", STAR, "-t", "True", "--basedir", basedir, "lightning.trainer.max_steps=1",
                     *overrides, timeout=300)
    return result, basedir


@pytest.mark.parametrize("override, names", [
    ("model.params.personalization_config.params.initializer_word=[star]", ["'initializer_word'",
                                                                           "did you mean 'initializer_words'"]),
    ("model.params.personalization_config.params.initializer_words=null", ["initializer_words is missing"]),
    ("model.params.sample_step=3", ["'sample_step'", "'sample_steps'"]),
    ("data.params.train.params.templates_=x", ["'templates_'"]),
    ("lightning.trainer.max_step=3", ["'max_step'", "'max_steps'"]),
    ("lightning.callbacks.image_logger.params.batch_freq=3", ["'batch_freq'", "'batch_frequency'"]),
])
def test_misspelt_or_missing_config_keys_stop_before_training(tmp_path, override, names):
    result, basedir = train_star(tmp_path, override)
    assert_user_error(result, *names)
    assert not basedir.exists() or not any(basedir.iterdir())


def test_bad_training_data_fails_at_once_naming_the_file_and_leaves_no_log_folder(tmp_path, star_data):
    (star_data / "02.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    result, basedir = train_star(tmp_path, f"data.params.train.params.data_root={star_data}")
    assert_user_error(result, "02.png")
    assert not basedir.exists() or not any(basedir.iterdir())


@pytest.mark.parametrize("damage, name", [("missing", "mask"), ("empty", "03.png")])
def test_missing_or_empty_mask_names_it(tmp_path, star_data, damage, name):
    mask = star_data / "mask" / "03.png"
    if damage == "missing":
        mask.unlink()
    else:
        Image.new("L", (32, 32), 0).save(mask)
    result, basedir = train_star(tmp_path, f"data.params.train.params.data_root={star_data}")
    assert_user_error(result, name)
    assert not basedir.exists() or not any(basedir.iterdir())


def test_multi_token_placeholder_is_named(tmp_path):
    result, _ = train_star(tmp_path, "model.params.personalization_config.params.placeholder_strings=[birdbath]")
    assert_user_error(result, "birdbath")


def test_c_inv_of_the_wrong_size_is_named(tmp_path):
    wrong = tmp_path / "C_inv_wrong.npy"
    np.save(wrong, np.eye(16))
    result, basedir = train_star(tmp_path, f"model.params.C_inv_path={wrong}")
    assert_user_error(result, "C_inv_wrong.npy", "width 128")
    assert not basedir.exists() or not any(basedir.iterdir())


def test_missing_c_inv_hint_is_a_command_that_runs_as_printed(tmp_path):
    result, _ = train_star(tmp_path, f"model.params.C_inv_path={tmp_path / 'C.npy'}")
    message = assert_user_error(result, "data/estimate_C_inv.py")
    assert f"--ckpt {TOY_BASE}" in message and f"--save_path {tmp_path / 'C.npy'}" in message


def test_main_without_train_flag_says_what_to_do_and_writes_nothing(tmp_path):
    result = run_cli("main.py", "--base", STAR, "--basedir", tmp_path / "runs", timeout=120)
    assert_user_error(result, "add -t")
    assert not (tmp_path / "runs").exists()


# ----- generation ------------------------------------------------------------------------------------------------
def txt2img(tmp_path, *args, prompt="a photo of a {} on a white background", concept=TOY_CONCEPT, ckpt=TOY_BASE):
    command = ["--config", TOY_CONFIG, "--ckpt", ckpt, "--prompt", prompt, "--n_samples", "1", "--n_iter", "1",
               "--steps", "2", "--outdir", tmp_path / "out", *args]
    if concept:
        command += ["--personalized_ckpt", concept]
    return run_cli("scripts/perfusion_txt2img.py", *command, timeout=120)


@pytest.mark.parametrize("args, names", [
    (["--n_iter", "0"], ["--n_iter 0"]),
    (["--n_samples", "0"], ["--n_samples 0"]),
    (["--steps", "0"], ["--steps 0"]),
])
def test_zero_counts_are_errors(tmp_path, args, names):
    assert_user_error(txt2img(tmp_path, *args), *names)
    assert not (tmp_path / "out").exists()


def test_prompt_without_placeholder_while_a_concept_is_given_is_an_error(tmp_path):
    assert_user_error(txt2img(tmp_path, prompt="a photo of a square"), "a photo of a square", "{}")


def test_too_long_prompt_losing_the_concept_is_an_error_and_otherwise_a_warning(tmp_path):
    words = " ".join(["red"] * 25)  # the toy encoder reads 22 tokens
    assert_user_error(txt2img(tmp_path, prompt=f"{words} and a {{}}"), "'*'", "cut away")
    kept = txt2img(tmp_path, prompt=f"a {{}} on a white background and {words}")
    assert kept.returncode == 0, kept.stderr[-2000:]
    assert "the text encoder reads the first 22" in kept.stderr and "red red" in kept.stderr
    assert len(list((tmp_path / "out" / "samples").glob("*.png"))) == 1


def poisoned_checkpoint(path: Path) -> Path:
    import pickle

    class Payload:
        def __reduce__(self):
            return (exec, ("open('PWNED', 'w').write('x')",))

    path.write_bytes(pickle.dumps({"state_dict": {"x": Payload()}}, protocol=2))
    return path


@pytest.mark.parametrize("make, names", [
    (lambda p: (p / "cut.safetensors").write_bytes((REPO / TOY_CONCEPT).read_bytes()[:4000]) and p / "cut.safetensors",
     ["cut.safetensors", "incomplete"]),
    (lambda p: (p / "photo.safetensors").write_bytes((REPO / "docs/toy_demo.png").read_bytes()) and
     p / "photo.safetensors", ["photo.safetensors", "PNG image"]),
    (lambda p: poisoned_checkpoint(p / "concept.ckpt"), ["concept.ckpt"]),
])
def test_unreadable_or_poisoned_concept_files_are_named(tmp_path, make, names):
    result = txt2img(tmp_path, concept=make(tmp_path))
    assert_user_error(result, *names)
    assert not (tmp_path / "PWNED").exists() and not (REPO / "PWNED").exists()


@pytest.mark.parametrize("make, names", [
    (lambda p: (p / "base.safetensors").write_bytes((REPO / TOY_BASE).read_bytes()[:5_000_000]) and
     p / "base.safetensors", ["base.safetensors", "incomplete", "download it again"]),
    (lambda p: shutil.copyfile(REPO / "docs/toy_demo.png", p / "model.ckpt") and p / "model.ckpt",
     ["model.ckpt", "not a checkpoint", "PNG image"]),
    (lambda p: poisoned_checkpoint(p / "evil.ckpt"), ["evil.ckpt", "would run code"]),
    (lambda p: Path(shutil.copyfile(REPO / TOY_CONCEPT, p / "other.safetensors")), ["other.safetensors", "lacks"]),
])
def test_bad_base_checkpoints_are_named_and_said_what_they_are(tmp_path, make, names):
    result = txt2img(tmp_path, ckpt=make(tmp_path), concept=None, prompt="a red star on a white background")
    assert_user_error(result, *names)
    assert not (tmp_path / "PWNED").exists() and not (REPO / "PWNED").exists()


def test_load_state_dict_tells_a_cut_download_from_another_kind_of_file(tmp_path):
    cut = tmp_path / "model.safetensors"
    cut.write_bytes((REPO / TOY_BASE).read_bytes()[:1_000_000])
    with pytest.raises(CheckpointError, match=r"incomplete: 1,000,000 of the [\d,]+ bytes"):
        load_state_dict(cut)
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="neither a PyTorch checkpoint nor a .safetensors file"):
        load_state_dict(text)


# ----- data tools ------------------------------------------------------------------------------------------------
def test_estimate_c_inv_checks_its_output_path_before_any_model_loads(tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("a red star\n")
    result = run_cli("data/estimate_C_inv.py", "--caption", captions, "--config", TOY_CONFIG, "--ckpt", TOY_BASE,
                     "--save_path", tmp_path, timeout=120)
    assert_user_error(result, f"--save_path {tmp_path}", ".npy")
    result = run_cli("data/estimate_C_inv.py", "--caption", captions, "--config", TOY_CONFIG, "--ckpt",
                     tmp_path / "none.ckpt", "--save_path", tmp_path / "C.npy", timeout=120)
    assert_user_error(result, "none.ckpt")


def test_estimate_c_inv_help_names_the_paths_the_configs_read():
    result = run_cli("data/estimate_C_inv.py", "--help", timeout=120)
    assert result.returncode == 0
    for config, path in (("perfusion_teddy.yaml", "ckpt/C_inv.npy"), ("perfusion_teddy_sd_v2.yaml",
                                                                       "ckpt/C_inv_sd_v2.npy")):
        assert f'"./{path}"' in (REPO / "configs" / config).read_text() and f"--save_path {path}" in result.stdout


def test_a_crop_that_discards_most_of_an_image_is_named(tmp_path):
    from perfusion.dataset import PersonalizedBase

    root = tmp_path / "concept"
    (root / "mask").mkdir(parents=True)
    Image.new("RGB", (400, 30), "red").save(root / "panorama.png")
    Image.new("L", (400, 30), 255).save(root / "mask" / "panorama.png")
    Image.new("RGB", (40, 30), "red").save(root / "square.png")
    Image.new("L", (40, 30), 255).save(root / "mask" / "square.png")
    with pytest.warns(UserWarning, match=r"discards more than half of 1 image\(s\): \S*panorama.png keeps 8 %"):
        PersonalizedBase(root, size=32)


# ----- precision -------------------------------------------------------------------------------------------------
def test_c_inv_target_input_is_float32_of_a_float64_product_even_under_autocast(tiny_world):
    config = tiny_world.perfusion_config()
    model = instantiate_from_config(config.model)
    model.target_input.copy_(torch.randn(model.target_input.shape, generator=torch.Generator().manual_seed(0)))
    reference = (model.c_inv @ model.target_input.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = model.c_inv_target_input()
    assert a.dtype == torch.float32
    assert float((a.double() - reference).norm() / reference.norm()) < 1e-6


def test_base_checkpoint_of_another_family_is_named_with_the_config_to_use(tiny_world_sd2, tmp_path):
    result = run_cli("scripts/perfusion_txt2img.py", "--config", "configs/tiny/perfusion-inference-sd1-tiny.yaml",
                     "--ckpt", tiny_world_sd2.ckpt, "--prompt", "a photo", "--n_samples", "1", "--steps", "1",
                     "--H", "32", "--W", "32", "--outdir", tmp_path, timeout=120)
    assert_user_error(result, tiny_world_sd2.ckpt.name, "sd2", "v2-inference.yaml")


def test_bare_train_flag_before_an_override_means_train():
    from main import bare_train_flag

    assert bare_train_flag(["--base", "c.yaml", "-t", "model.params.beta=0.7"]) == [
        "--base", "c.yaml", "-t", "True", "model.params.beta=0.7"]
    assert bare_train_flag(["-t", "False", "x=1"]) == ["-t", "False", "x=1"]
    assert bare_train_flag(["-t"]) == ["-t"]


def test_validation_prompts_come_from_a_file_and_must_name_the_concept(tmp_path):
    from perfusion.validation import ValidationPrompts

    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\na photo of a {}\n\na {} in the snow\n")
    assert ValidationPrompts(prompts_file=str(path)).prompts == ["a photo of a {}", "a {} in the snow"]
    with pytest.raises(BadValueError, match="must name the concept"):
        ValidationPrompts(prompts=["a photo of a teddy"])
    with pytest.raises(MissingFileError, match="nowhere.txt"):
        ValidationPrompts(prompts_file=str(tmp_path / "nowhere.txt"))
    with pytest.raises(BadValueError, match="every_n_steps"):
        ValidationPrompts(every_n_steps=0)
