"""Training a base model (the toy world's pretraining path): min-SNR, warm-up, EMA of a jointly trained text
encoder, export in the original layout, and main.py end to end at toy size."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.lr_scheduler import LinearWarmUp
from ldm.modules.ema import LitEma
from ldm.util import instantiate_from_config, load_state_dict

REPO = Path(__file__).resolve().parent.parent
TOY_BASE = REPO / "configs" / "toy" / "base.yaml"


def small_toy_config():
    return OmegaConf.load(TOY_BASE)


def test_min_snr_weight_matches_the_formula():
    model = instantiate_from_config(small_toy_config().model)
    t = torch.tensor([0, 10, 300, 600, 999])
    alpha_bar = model.alphas_cumprod[t].double()
    snr = alpha_bar / (1 - alpha_bar)
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1)  # v-prediction
    assert torch.allclose(model.min_snr_weight(t).double(), expected, rtol=1e-5)
    model.parameterization = "eps"
    assert torch.allclose(model.min_snr_weight(t).double(), expected * (snr + 1) / snr, rtol=1e-4)


def test_linear_warm_up():
    schedule = LinearWarmUp(200)
    assert schedule(0) == 0.0 and schedule(100) == 0.5 and schedule(200) == 1.0 and schedule(5000) == 1.0


def test_ema_update_is_the_moving_average():
    net = torch.nn.Linear(3, 2)
    ema = LitEma(net, decay=0.9, use_num_updates=False)
    before = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema(net)
    shadow = dict(ema.named_buffers())["weight"]
    assert torch.allclose(shadow, 0.9 * before + 0.1 * net.weight.detach(), atol=1e-6)


def test_trainable_text_encoder_is_averaged_and_exported():
    model = instantiate_from_config(small_toy_config().model)
    assert model.cond_stage_model_ema is not None
    names = {id(p) for p in model.trainable_parameters()}
    assert id(model.cond_stage_model.token_embedding.weight) in names
    exported_before = model.base_state_dict()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    exported = model.base_state_dict()
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    assert key in exported and any(k.startswith("model.diffusion_model.") for k in exported)
    # EMA weights (not yet updated) are exported, not the raw ones
    assert torch.equal(exported[key], exported_before[key])
    model.on_train_batch_end()
    assert not torch.equal(model.base_state_dict()[key], exported_before[key])


def _lightning_trainer(max_steps: int, accumulate_grad_batches: int):
    import pytorch_lightning as pl

    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps,
                      accumulate_grad_batches=accumulate_grad_batches, precision=32, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0)


def test_lightning_updates_both_averages_once_per_micro_batch():
    """A real Lightning Trainer with gradient accumulation over 2 micro-batches, 2 optimizer steps: Lightning calls
    the EMA update of the UNet and of the jointly trained text encoder after each of the 4 micro-batches, after the
    optimizer step on the last micro-batch of each step; the averages are those of the weights seen at the 4 calls."""
    from torch.utils.data import DataLoader

    config = small_toy_config()
    config.model.params.scheduler_config = None  # no warm-up: the first optimizer step changes the weights
    model = instantiate_from_config(config.model)
    dataset = instantiate_from_config(OmegaConf.merge(config.data.params.train, {"params": {"size": 4}}))
    pairs = model.ema_pairs()
    assert [module for _, module in pairs] == [model.model, model.cond_stage_model]
    start = [{n: p.detach().clone() for n, p in module.named_parameters() if n in ema.name_map}
             for ema, module in pairs]
    seen = [[] for _ in pairs]  # per average: (weights at the call, optimizer steps so far)
    trainer = _lightning_trainer(max_steps=2, accumulate_grad_batches=2)
    for (ema, module), calls in zip(pairs, seen):
        update = ema.forward

        def counted(averaged, update=update, calls=calls, module=module):
            assert averaged is module
            calls.append(({n: p.detach().clone() for n, p in averaged.named_parameters()}, trainer.global_step))
            return update(averaged)

        ema.forward = counted
    trainer.fit(model, DataLoader(dataset, batch_size=1))
    assert trainer.global_step == 2
    for (ema, module), calls, before in zip(pairs, seen, start):
        assert [step for _, step in calls] == [0, 1, 1, 2]  # after micro-batches 1-4; steps on 2 and 4
        assert int(ema.num_updates) == 4
        name = next(iter(ema.name_map))
        weights = [state[name] for state, _ in calls]
        assert torch.equal(weights[0], before[name]) and torch.equal(weights[2], weights[1])
        assert not torch.equal(weights[1], weights[0]) and not torch.equal(weights[3], weights[2])
        shadow = dict(ema.named_buffers())
        for name, buffer_name in ema.name_map.items():
            expected = before[name].clone()
            for n, (state, _) in enumerate(calls, start=1):
                decay = min(float(ema.decay), (1 + n) / (10 + n))
                expected = decay * expected + (1 - decay) * state[name]
            torch.testing.assert_close(shadow[buffer_name], expected, rtol=1e-5, atol=1e-6)


def test_main_trains_a_toy_base_model_and_exports_it(tmp_path):
    result = subprocess.run(
        [sys.executable, "main.py", "--base", str(TOY_BASE), "-t", "True", "--name", "base", "--basedir",
         str(tmp_path), "data.params.batch_size=4", "lightning.trainer.max_steps=3",
         "lightning.modelcheckpoint_step.params.every_n_train_steps=2",
         "lightning.callbacks.image_logger.params.batch_frequency=2",
         "lightning.callbacks.image_logger.params.ddim_steps=2",
         "lightning.callbacks.thread_tuner.params.probe=1",
         # the part-3 options of ckpt/toy/README.md, through the command line
         "model.params.truncation_dropout=0.6", "model.params.word_dropout=0.2"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    logdir = next(p for p in tmp_path.iterdir() if p.is_dir())
    exports = sorted(p.name for p in (logdir / "checkpoints").glob("base-*.safetensors"))
    assert exports == ["base-last.safetensors", "base-step000002.safetensors", "base-step000003.safetensors"]
    assert "[threads]" in result.stdout
    state = load_state_dict(logdir / "checkpoints" / "base-last.safetensors")
    assert all(v.dtype == torch.float16 for k, v in state.items() if k.startswith(("model.", "cond_stage_model.")))
    assert state["alphas_cumprod"].dtype == torch.float32 and float(state["alphas_cumprod"][0]) < 1.0
    # loads into the inference model with nothing missing
    config = OmegaConf.load(REPO / "configs" / "toy" / "inference.yaml")
    model = instantiate_from_config(config.model)
    missing, unexpected = model.init_from_ckpt(str(logdir / "checkpoints" / "base-last.safetensors"))
    perfusion_state = ("target_input", "superclass_input", "targets_initialized", "embedding_manager.")
    assert [k for k in missing if not k.endswith("target_output") and not k.startswith(perfusion_state)] == []
    assert unexpected == [] and "alphas_cumprod" in state
    samples = {p.name.split("_gs-")[0] for p in (logdir / "images" / "train").glob("*.png")}
    assert {"inputs", "samples", "samples_scale4"} <= samples
    loaded = model.model.diffusion_model.out[2].weight
    assert np.allclose(loaded.detach().numpy(), state["model.diffusion_model.out.2.weight"].float().numpy())


def test_training_on_from_an_exported_model_starts_the_averages_at_its_weights(tmp_path):
    from safetensors.torch import save_file

    model = instantiate_from_config(small_toy_config().model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    model.on_train_batch_end()
    path = tmp_path / "export.safetensors"
    save_file({k: v.contiguous() for k, v in model.base_state_dict(use_ema=False).items()}, str(path))
    config = small_toy_config()
    config.model.params.ckpt_path = str(path)
    resumed = instantiate_from_config(config.model)
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    exported = load_state_dict(path)
    assert torch.equal(resumed.base_state_dict(use_ema=True)[key], exported[key])
    assert torch.equal(resumed.base_state_dict(use_ema=True)["model.diffusion_model.out.2.weight"],
                       exported["model.diffusion_model.out.2.weight"])


def test_offset_noise_shifts_each_channel_by_one_random_value():
    model = instantiate_from_config(small_toy_config().model)
    x = torch.zeros(256, 3, 32, 32)
    torch.manual_seed(0)
    model.noise_offset = 0.0
    plain = model.training_noise(x)
    model.noise_offset = 0.5
    offset = model.training_noise(x)
    # per-(sample, channel) means: std 1/32 for plain Gaussian noise, about 0.5 with the offset
    assert float(plain.mean(dim=(2, 3)).std()) < 0.05
    assert 0.4 < float(offset.mean(dim=(2, 3)).std()) < 0.6
    assert 0.9 < float((offset - offset.mean(dim=(2, 3), keepdim=True)).std()) < 1.1


def test_truncation_and_word_dropout_replace_encodings_by_the_empty_captions():
    config = small_toy_config()
    config.model.params.truncation_dropout, config.model.params.word_dropout = 1.0, 0.0
    model = instantiate_from_config(config.model).train()
    captions = ["a red star on a white background", "", "a blue square and a green circle on a black background"]
    with torch.no_grad():
        c = model.get_learned_conditioning(captions)
        empty = model.get_learned_conditioning([""])[0]
    torch.manual_seed(0)
    for _ in range(20):
        with torch.no_grad():
            dropped = model.drop_context_tokens(c, captions)
        # each caption keeps BOS and its first k words (k >= 1), then the empty caption's encodings
        assert torch.equal(dropped[1], empty)
        for row, first_eos in ((0, 8), (2, 12)):
            kept = (dropped[row] == c[row]).all(-1)
            emptied = (dropped[row] == empty).all(-1)
            n_kept = int(kept.int().argmin())
            assert 2 <= n_kept <= first_eos
            assert emptied[n_kept:].all() and kept[:n_kept].all()

    # the cut is uniform over the words: 7 words, so each of the 7 cuts in about 1/7 of 2,800 captions
    many_captions = captions[:1] * 2800
    with torch.no_grad():
        many = model.drop_context_tokens(c[:1].expand(2800, -1, -1), many_captions)
    n_kept = (many == c[:1]).all(-1).sum(1)
    counts = torch.bincount(n_kept, minlength=9)[2:9]
    assert counts.min() > 300 and counts.max() < 500, counts

    model.truncation_dropout, model.word_dropout = 0.0, 0.3
    with torch.no_grad():
        many = model.drop_context_tokens(c[:1].expand(400, -1, -1), many_captions[:400])
    words_kept = (many[:, 1:8] == c[0, 1:8]).all(-1)
    words_emptied = (many[:, 1:8] == empty[1:8]).all(-1)
    assert torch.equal(words_kept, ~words_emptied)
    assert 0.25 < 1 - float(words_kept.float().mean()) < 0.35
    assert torch.equal(many[:, 0], c[:1, 0].expand(400, -1)) and torch.equal(many[:, 8:], c[:1, 8:].expand(400, -1, -1))
    for key in ("truncation_dropout", "word_dropout"):
        bad = small_toy_config()
        bad.model.params[key] = 1.5
        with pytest.raises(ValueError, match=key):
            instantiate_from_config(bad.model)


def test_thread_tuner_drops_a_collapsed_setting_after_one_step(monkeypatch):
    """Two threads that collapse under contention (10x slower) cost one probe step, not ``probe`` of them."""
    import time
    from types import SimpleNamespace

    from main import ThreadTuner

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    tuner = ThreadTuner(candidates=(1, 2), period=1000, probe=3)
    clock = {"now": 0.0}
    monkeypatch.setattr(time, "perf_counter", lambda: clock["now"])
    step_seconds = {1: 1.0, 2: 10.0}
    module = SimpleNamespace(log=lambda *args, **kwargs: None)
    trainer = SimpleNamespace(global_step=0)
    used, before = [], torch.get_num_threads()
    try:
        for step in range(6):
            trainer.global_step = step
            tuner.on_train_batch_start(trainer, module, None, step)
            threads = torch.get_num_threads()
            used.append(threads)
            clock["now"] += step_seconds[threads]
            tuner.on_train_batch_end(trainer, module, None, None, step)
    finally:
        torch.set_num_threads(before)
    assert used[:4] == [1, 1, 1, 2]  # three probes of one thread, one of two threads
    assert used[4:] == [1, 1] and tuner.reference == 1.0
