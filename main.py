"""Train a Perfusion concept: ``python main.py --name teddy --base configs/perfusion_teddy.yaml -t --gpus 0,``.

Writes ``<basedir>/<timestamp>_<name><postfix>/`` with configs/ (snapshots), checkpoints/ (Lightning, for -r),
concepts/ (concept files every N steps), images/ and TensorBoard events; the final concept is also copied to
``<basedir>/<name>.safetensors`` for scripts/perfusion_txt2img.py.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import inspect
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import warnings

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ldm.util import (ConfigError, MissingFileError, UserError, accepted_parameters, atomic_write,
                      check_config_keys, get_obj_from_str, instantiate_from_config, one_line_warnings,
                      validate_config)

# The frozen base model is in eval mode on purpose.
warnings.filterwarnings("ignore", message=".*module\(s\) in eval mode at the start of training.*")

BASE_WEIGHTS_HELP = {
    "v1-5": "https://huggingface.co/runwayml/stable-diffusion-v1-5/resolve/main/v1-5-pruned-emaonly.ckpt",
    "v2-1": "https://huggingface.co/stabilityai/stable-diffusion-2-1-base/resolve/main/v2-1_512-ema-pruned.ckpt",
    "sdxl": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
}


def str2bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got '{value}'")


def bare_train_flag(argv: list[str]) -> list[str]:
    """``-t`` takes an optional boolean; followed by a ``key=value`` override it means ``-t True`` (argparse would
    otherwise read the override as the boolean and stop with a usage error)."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg in ("-t", "--train") and i + 1 < len(argv) and "=" in argv[i + 1] and not argv[i + 1].startswith("-"):
            out.append("True")
    return out


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--name", type=str, default="", help="experiment name (log folder, concept file)")
    parser.add_argument("-b", "--base", nargs="*", metavar="config.yaml", default=[],
                        help="configs, merged left to right; later ones and dotlist overrides win")
    parser.add_argument("--basedir", type=str, default=None,
                        help="where log folders and concepts go (default: logs; with -r: the log folder's parent)")
    parser.add_argument("-t", "--train", type=str2bool, nargs="?", const=True, default=False, help="train")
    parser.add_argument("--gpus", type=str, default=None, help="CUDA devices, e.g. '0,' or '0,1'; absent: CPU")
    parser.add_argument("--num_nodes", type=int, default=None, help="nodes for multi-node DDP")
    parser.add_argument("-r", "--resume", type=str, default="", help="log folder or checkpoint to resume from")
    parser.add_argument("-s", "--seed", type=int, default=23, help="seed for everything")
    parser.add_argument("-p", "--postfix", "--project", type=str, default="", help="postfix of the log folder name")
    return parser


# ----- data ------------------------------------------------------------------------------------------------
class DataModuleFromConfig(pl.LightningDataModule):
    UNUSED_CONFIG_KEYS = {
        "wrap": "datasets are not wrapped; the training length is lightning.trainer.max_steps",
        "test": "there is no test loop",
        "predict": "there is no predict loop",
        "validation": "there is no validation loop",
        "use_worker_init_fn": "DataLoader workers are seeded by seed_everything(workers=True) (-s/--seed)",
    }

    def __init__(self, batch_size: int, train=None, num_workers: int | None = None,
                 shuffle: bool = True):
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = min(num_workers if num_workers is not None else batch_size * 2, os.cpu_count() or 1)
        self.dataset_configs = {"train": train} if train is not None else {}
        self.shuffle = shuffle
        self.datasets = {}

    def setup(self, stage=None):
        if not self.datasets:  # main() builds them before the log folder exists, so bad data fails early
            self.datasets = {k: instantiate_from_config(cfg) for k, cfg in self.dataset_configs.items()}

    def train_dataloader(self):
        dataset = self.datasets["train"]
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=self.shuffle, num_workers=self.num_workers,
                          drop_last=len(dataset) >= self.batch_size, persistent_workers=self.num_workers > 0)


# ----- callbacks -------------------------------------------------------------------------------------------
class OptimizerStepProgressBar(Callback):
    """One bar that counts optimizer steps toward max_steps (not dataset passes or micro-batches)."""

    def on_train_start(self, trainer, pl_module):
        self.bar = tqdm(total=trainer.max_steps if trainer.max_steps > 0 else None, initial=trainer.global_step,
                        desc="optimizer steps", disable=not trainer.is_global_zero, dynamic_ncols=True)
        self.last = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.last:
            self.bar.update(trainer.global_step - self.last)
            self.last = trainer.global_step
            loss = trainer.callback_metrics.get("loss")
            if loss is not None:
                self.bar.set_postfix(loss=f"{float(loss):.4f}")

    def on_train_end(self, trainer, pl_module):
        self.bar.close()


class DatasetEpoch(Callback):
    """Tells a dataset with ``set_epoch`` the epoch (the toy world draws new scenes each epoch; Lightning does
    not tell map-style datasets)."""

    def on_train_epoch_start(self, trainer, pl_module):
        dataset = getattr(trainer.datamodule, "datasets", {}).get("train") if trainer.datamodule else None
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(trainer.current_epoch)


def atomic_copy(source, destination) -> None:
    """Copy through a temporary file and a rename, so readers never see a half-written file."""
    atomic_write(destination, lambda temporary: shutil.copyfile(source, temporary))


class ConceptCheckpoint(Callback):
    """Writes the concept file (atomically) every N optimizer steps and at the end of training."""

    def __init__(self, dirpath: str, name: str, every_n_train_steps: int = 100, final_copy: str | None = None):
        self.dirpath, self.name, self.every = Path(dirpath), name, every_n_train_steps
        self.final_copy = final_copy
        self.last_saved = -1

    @property
    def latest(self) -> Path:
        return self.dirpath / f"{self.name}.safetensors"

    def _save(self, trainer, pl_module) -> None:
        """``<name>-stepNNNNNN.safetensors`` and a copy as ``<name>.safetensors``, once per step."""
        step = trainer.global_step
        if not trainer.is_global_zero or not bool(pl_module.targets_initialized) or step == self.last_saved:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        written = pl_module.save_concept_file(self.dirpath / f"{self.name}-step{step:06d}.safetensors")
        atomic_copy(written, self.latest)
        self.last_saved = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > 0 and trainer.global_step % self.every == 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if trainer.world_size > 1:
            self._check_ranks_agree(trainer, pl_module)
        self._save(trainer, pl_module)
        if trainer.is_global_zero and self.final_copy and self.latest.is_file():
            atomic_copy(self.latest, self.final_copy)
            print(f"concept written to {self.final_copy}")


    def _check_ranks_agree(self, trainer, pl_module):
        """Every rank must hold the same concept; a divergence would make the saved file depend on the rank."""
        state = pl_module.concept_state_vector()
        gathered = pl_module.all_gather(state)  # (world, n)
        difference = float((gathered - gathered[0]).abs().max())
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            report = {"world_size": trainer.world_size, "max_abs_difference": difference, "numel": state.numel()}
            (self.dirpath / "rank_agreement.json").write_text(json.dumps(report, indent=2) + "\n")
        if difference != 0.0:
            raise RuntimeError(f"concept state differs across the {trainer.world_size} ranks by up to {difference}")


class BaseModelExport(Callback):
    """For base-model training (no concept): every N optimizer steps and at the end, writes the base model in the
    original checkpoint layout (EMA weights) as ``checkpoints/base-stepNNNNNN.safetensors`` plus
    ``checkpoints/base-last.safetensors``; these load with ``--ckpt`` / ``model.params.ckpt_path``."""

    def __init__(self, dirpath: str, every_n_train_steps: int = 500, dtype: str = "float16"):
        self.dirpath, self.every = Path(dirpath), every_n_train_steps
        self.dtype = getattr(torch, dtype)
        self.last_saved = -1

    def _save(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == self.last_saved:
            return
        from safetensors.torch import save_file

        self.dirpath.mkdir(parents=True, exist_ok=True)
        # Network weights in half precision; the noise schedule stays float32 (1 - 4e-5 rounds to 1 in fp16).
        # the model's own weight prefixes: cond_stage_model.* on SD 1.x/2.x, conditioner.* on SD XL
        prefixes = tuple(pl_module.BACKBONE_PREFIXES)
        state = {k: v.to(self.dtype).contiguous() if v.is_floating_point() and k.startswith(prefixes)
                 else v.contiguous() for k, v in pl_module.base_state_dict(use_ema=True).items()}
        path = self.dirpath / f"base-step{step:06d}.safetensors"
        atomic_write(path, lambda temporary: save_file(state, str(temporary), metadata={"global_step": str(step)}))
        atomic_copy(path, self.dirpath / "base-last.safetensors")
        self.last_saved = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > 0 and trainer.global_step % self.every == 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._save(trainer, pl_module)


class ThreadTuner(Callback):
    """Chooses the number of torch CPU threads by measurement: every ``period`` optimizer steps, and at once when
    steps become ``slowdown`` times slower than the last measurement (another process took a core).

    On a shared machine two threads can be many times slower than one (a busy core stalls every parallel
    region); on an idle one two are faster. Each candidate runs ``probe`` steps; the fastest median is kept. A
    candidate whose step takes ``2 * slowdown`` times the best median measured so far is dropped at once, so a
    collapsed setting costs one step, not ``probe``.
    """

    def __init__(self, candidates=(1, 2), period: int = 500, probe: int = 6, slowdown: float = 1.5,
                 window: int = 3):
        available = os.cpu_count() or 1
        self.candidates = [c for c in candidates if c <= available] or [1]
        self.period, self.probe, self.slowdown, self.window = period, probe, slowdown, window
        self.timings: dict[int, list[float]] = {}
        self.queue: list[int] = []
        self.recent: list[float] = []
        self.reference = None  # median step time of the chosen setting when last measured
        self.started = None

    @staticmethod
    def _median(values):
        return sorted(values)[len(values) // 2]

    def _start_probe(self):
        self.queue = [c for c in self.candidates for _ in range(self.probe)]
        self.timings, self.recent = {}, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import time

        slow = (self.reference is not None and len(self.recent) >= self.window
                and self._median(self.recent[-self.window:]) > self.slowdown * self.reference)
        if not self.queue and (trainer.global_step % self.period == 0 or self.reference is None or slow):
            self._start_probe()
        if self.queue:
            torch.set_num_threads(self.queue[0])
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import time

        if self.started is None:
            return
        elapsed = time.perf_counter() - self.started
        if not self.queue:
            self.recent = (self.recent + [elapsed])[-self.window:]
            return
        threads = self.queue.pop(0)
        self.timings.setdefault(threads, []).append(elapsed)
        others = [self._median(v) for c, v in self.timings.items() if c != threads]
        if others and elapsed > 2 * self.slowdown * min(others):
            self.queue = [c for c in self.queue if c != threads]
        if not self.queue:
            best = min(self.timings, key=lambda c: self._median(self.timings[c]))
            self.reference = self._median(self.timings[best])
            torch.set_num_threads(best)
            summary = ", ".join(f"{c}: {self._median(v):.2f}s" for c, v in sorted(self.timings.items()))
            print(f"[threads] step {trainer.global_step}: median step time by threads {summary}; using {best}",
                  flush=True)
            pl_module.log("threads", float(best), on_step=True, logger=True)


class ImageLogger(Callback):
    """Saves input/reconstruction/mask/sample grids as PNG and to TensorBoard every ``batch_frequency`` steps."""

    UNUSED_CONFIG_KEYS = {
        "increase_log_steps": "images are logged every batch_frequency optimizer steps, not on a log scale",
        "frequency_base": "images are logged every batch_frequency optimizer steps, not on a log scale",
        "disabled": "set batch_frequency to a number above max_steps instead",
        "log_on_batch_idx": "images are logged by optimizer step",
        "log_images_kwargs": "use ddim_steps and max_images",
        "rescale": "images are always mapped from [-1, 1] to [0, 1]",
        "log_all_val": "there is no validation loop",
    }

    def __init__(self, logdir: str, batch_frequency: int = 25, max_images: int = 4, clamp: bool = True,
                 log_first_step: bool = False, ddim_steps: int | None = None, sample: bool = True):
        self.folder = Path(logdir) / "images" / "train"
        self.batch_frequency, self.max_images, self.clamp = batch_frequency, max_images, clamp
        self.sample = sample  # false: inputs, reconstructions and masks only (validation prompts do the sampling)
        self.log_first_step, self.ddim_steps = log_first_step, ddim_steps
        self.last_logged = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        due = (step > 0 and step % self.batch_frequency == 0) or (self.log_first_step and step == 0)
        if not due or step == self.last_logged or not trainer.is_global_zero:
            return
        self.last_logged = step
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            images = pl_module.log_images(batch, N=self.max_images, ddim_steps=self.ddim_steps, sample=self.sample)
        if was_training:
            pl_module.train()
        self.folder.mkdir(parents=True, exist_ok=True)
        import torchvision

        for key, tensor in images.items():
            tensor = tensor.detach().float().cpu()
            if self.clamp:
                tensor = tensor.clamp(-1, 1)
            grid = torchvision.utils.make_grid((tensor + 1) / 2, nrow=min(4, tensor.shape[0]))
            array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(array).save(self.folder / f"{key}_gs-{step:06d}_b-{batch_idx:06d}.png")
            if isinstance(trainer.logger, TensorBoardLogger):
                trainer.logger.experiment.add_image(f"train/{key}", grid, global_step=step)


# ----- configuration ------------------------------------------------------------------------------------------
def resolve_resume(opt):
    """-r accepts a log folder or a checkpoint inside it; returns (logdir, ckpt path, base configs)."""
    path = Path(opt.resume)
    if not path.exists():
        raise MissingFileError(f"--resume {opt.resume}: no such log folder or checkpoint")
    if path.is_file():
        logdir = path.parent.parent
        ckpt = path
    else:
        logdir = path
        ckpt = path / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise MissingFileError(f"--resume: no checkpoint at {ckpt} (training wrote none yet?)")
    base = sorted(glob.glob(str(logdir / "configs" / "*.yaml")))
    if not base:
        raise MissingFileError(f"--resume {opt.resume}: {logdir / 'configs'} holds no config snapshot; "
                               "give the log folder that main.py wrote")
    return logdir, ckpt, base


def keep_newer_outputs(logdir: Path, ckpt: Path, final_concept: Path) -> None:
    """Resuming from a checkpoint older than the run's last.ckpt would overwrite last.ckpt and the final concept
    with an older line of training: keep copies of both (stamped with the time of last.ckpt) and say so."""
    last = logdir / "checkpoints" / "last.ckpt"
    if ckpt.resolve() == last.resolve() or not last.is_file() or last.stat().st_mtime <= ckpt.stat().st_mtime:
        return
    stamp = datetime.datetime.fromtimestamp(last.stat().st_mtime).strftime("%Y-%m-%dT%H-%M-%S")
    kept = [last.with_name(f"last-before-resume-{stamp}.ckpt")]
    shutil.copyfile(last, kept[0])
    if final_concept.is_file():
        kept.append(final_concept.with_name(f"{final_concept.stem}-before-resume-{stamp}.safetensors"))
        shutil.copyfile(final_concept, kept[1])
    print(f"note: {ckpt.name} is older than last.ckpt; training from it replaces last.ckpt"
          f"{' and ' + str(final_concept) if final_concept.is_file() else ''}. The newer files are kept as "
          f"{' and '.join(map(str, kept))}.", file=sys.stderr)


def check_model_files(model_config) -> None:
    """Clear errors for missing weights before the (slow) model build."""
    params = model_config.get("params", {})
    ckpt = params.get("ckpt_path")
    if ckpt and Path(ckpt).is_dir():
        from ldm.diffusers_format import diffusers_folder_problem
        from ldm.util import CheckpointError

        problem = diffusers_folder_problem(ckpt)
        if problem:
            raise CheckpointError(f"model.params.ckpt_path: {problem}")
    elif ckpt and not Path(ckpt).is_file():
        raise MissingFileError(
            f"base checkpoint not found: {ckpt}\n"
            f"Download Stable Diffusion into ./ckpt/: SD 1.5 from {BASE_WEIGHTS_HELP['v1-5']}\n"
            f"or SD 2.1 from {BASE_WEIGHTS_HELP['v2-1']}\nor SD XL base 1.0 from {BASE_WEIGHTS_HELP['sdxl']},\n"
            "or set model.params.ckpt_path=<path> on the command line."
        )
    c_inv = params.get("C_inv_path")
    if c_inv and not Path(c_inv).is_file():
        encoder_target = str(params.get("cond_stage_config", {}).get("target", ""))
        kind = "sdxl" if "SDXLConditioner" in encoder_target else "openclip" if "OpenCLIP" in encoder_target else "clip"
        raise MissingFileError(
            f"C^-1 file not found: {c_inv}\n"
            f"Make it once per text encoder: python data/estimate_C_inv.py --caption captions.txt --type {kind} "
            f"--ckpt {ckpt or '<base checkpoint>'} --save_path {c_inv}  (README: 'Estimating C^-1')"
        )


def check_training_config(model_config) -> None:
    """A concept model must say which super-class its keys lock to: without initializer words the embedding
    would stay inactive and never learn."""
    personalization = model_config.get("params", {}).get("personalization_config")
    if personalization is None:
        return
    words = (personalization.get("params") or {}).get("initializer_words")
    if not words:
        raise ConfigError("model.params.personalization_config.params.initializer_words is missing: training needs "
                          "the concept's super-class word, e.g. initializer_words: [teddy]")


def fill_dataset_words(config, seed: int) -> None:
    """The dataset's placeholder, super-class word and (where it takes one: the toy world's scenes) seed default
    to the run's."""
    personalization = config.model.params.get("personalization_config", {}).get("params", {})
    train = config.get("data", {}).get("params", {}).get("train")
    if train is None:
        return
    params = train.setdefault("params", {})
    if "placeholder_token" not in params and personalization.get("placeholder_strings"):
        params["placeholder_token"] = personalization["placeholder_strings"][0]
    if "superclass" not in params and personalization.get("initializer_words"):
        params["superclass"] = personalization["initializer_words"][0]
    target = train.get("target")
    if target and "seed" in (accepted_parameters(get_obj_from_str(str(target))) or {"seed"}):
        params.setdefault("seed", seed)


def trainer_settings(opt, lightning_config) -> dict:
    settings = dict(OmegaConf.to_container(lightning_config.get("trainer", OmegaConf.create()), resolve=True))
    settings.pop("gpus", None)
    if opt.gpus is not None and opt.gpus.strip(", ") != "":
        if not torch.cuda.is_available():
            raise UserError(f"--gpus {opt.gpus} asks for CUDA, but torch sees no CUDA device; "
                             "drop --gpus to train on the CPU")
        devices = [int(g) for g in opt.gpus.split(",") if g.strip() != ""]
        settings.update(accelerator="gpu", devices=devices)
    else:
        settings.setdefault("accelerator", "cpu")
        settings.setdefault("devices", 1)
        precision = str(settings.get("precision", "32"))
        if settings["accelerator"] == "cpu" and precision.startswith("16"):
            print(f"precision {precision} needs CUDA; using 32-bit on the CPU")
            settings["precision"] = "32-true"
    if opt.num_nodes:
        settings["num_nodes"] = opt.num_nodes
    devices = settings.get("devices", 1)
    n_devices = len(devices) if isinstance(devices, (list, tuple)) else int(devices)
    if (n_devices > 1 or settings.get("num_nodes", 1) > 1) and settings.get("strategy") in (None, "auto"):
        settings["strategy"] = "ddp"
    settings.setdefault("max_epochs", -1)
    settings.setdefault("max_steps", 400)
    settings.setdefault("log_every_n_steps", 1)
    settings["enable_progress_bar"] = False
    return settings


def main(argv=None):
    """Command-line entry: a user error (bad file, value or config) prints one or two lines on stderr, exits with
    code 2 and leaves no half-made log folder; internal errors keep their traceback."""
    created: list[Path] = []
    one_line_warnings()
    try:
        return train(argv, created)
    except UserError as err:
        for folder in created:
            if folder.is_dir() and not any((folder / "checkpoints").glob("*.ckpt")):
                shutil.rmtree(folder, ignore_errors=True)
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def train(argv=None, created: list | None = None):
    """Build the model, data and trainer from the configs and train; ``created`` receives the new log folder."""
    parser = get_parser()
    opt, unknown = parser.parse_known_args(bare_train_flag(sys.argv[1:] if argv is None else list(argv)))
    if opt.name and opt.resume:
        raise UserError("-n/--name and -r/--resume cannot be given together (resume keeps the old name)")
    if not opt.train:
        what = f"-r {opt.resume} -t" if opt.resume else "-t"
        raise UserError(f"nothing to do: add {what} to train (main.py only trains; generate with "
                        "scripts/perfusion_txt2img.py)")
    ckpt = None
    if opt.resume:
        logdir, ckpt, resumed_base = resolve_resume(opt)
        opt.base = resumed_base + opt.base
        # the log folder is <time>_<name><postfix>; it lives in the run's basedir
        name = logdir.name.split("_", 1)[-1].removesuffix(opt.postfix)
        if opt.basedir is not None and Path(opt.basedir).resolve() != logdir.parent.resolve():
            raise UserError(f"--basedir {opt.basedir} differs from the resumed run's folder {logdir.parent}; "
                            "drop --basedir (a resumed run stays where it was started)")
        basedir = logdir.parent
    else:
        if not opt.base:
            raise UserError("give at least one config with --base (e.g. --base configs/perfusion_teddy.yaml)")
        name = opt.name or Path(opt.base[0]).stem
        now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
        basedir = Path(opt.basedir if opt.basedir is not None else "logs")
        logdir = basedir / f"{now}_{name}{opt.postfix}"
    for path in opt.base:
        if not Path(path).is_file():
            raise MissingFileError(f"config not found: {path}")
    try:
        configs = [OmegaConf.load(p) for p in opt.base]
    except Exception as err:
        raise ConfigError(f"could not read the configs {opt.base}: {str(err).splitlines()[0]}") from err
    try:
        cli = OmegaConf.from_dotlist(unknown)
    except Exception as err:
        raise ConfigError(f"could not read overrides {unknown}: {str(err).splitlines()[0]} (use key.sub=value)")
    config = OmegaConf.merge(*configs, cli)
    lightning_config = config.pop("lightning", OmegaConf.create())
    check_config_keys("config", list(config.keys()), {"model", "data"})
    if "model" not in config or "data" not in config:
        raise ConfigError(f"the configs {opt.base} need a 'model' and a 'data' section")
    validate_config(config.model, "model")
    validate_config(config.data, "data")
    check_lightning_config(lightning_config)

    pl.seed_everything(opt.seed, workers=True, verbose=False)
    check_model_files(config.model)
    check_training_config(config.model)
    fill_dataset_words(config, opt.seed)
    settings = trainer_settings(opt, lightning_config)

    data = instantiate_from_config(config.data)
    data.setup("fit")  # reads and checks every image and mask now, before the slow model build
    model = instantiate_from_config(config.model)
    for key in ("embedding_learning_rate", "target_output_learning_rate"):
        if key in config.model:
            setattr(model, key, float(config.model[key]))
    if "base_learning_rate" in config.model:  # used as given: not scaled by batch size or devices
        model.learning_rate = float(config.model.base_learning_rate)

    ckptdir, cfgdir = logdir / "checkpoints", logdir / "configs"
    checkpoint_params = dict(OmegaConf.to_container(
        lightning_config.get("modelcheckpoint_step", {}).get("params", OmegaConf.create()), resolve=True))
    every = int(checkpoint_params.pop("every_n_train_steps", 100))
    callback_configs = OmegaConf.to_container(lightning_config.get("callbacks", OmegaConf.create()), resolve=True)
    image_params = (callback_configs.pop("image_logger", None) or {}).get("params", {})
    for key in check_config_keys("lightning.callbacks.image_logger.params", image_params,
                                 accepted_parameters(ImageLogger) - {"logdir"}, ImageLogger.UNUSED_CONFIG_KEYS):
        image_params.pop(key)
    final_concept = basedir / f"{name}.safetensors"
    callbacks = [
        OptimizerStepProgressBar(),
        DatasetEpoch(),
        ModelCheckpoint(dirpath=str(ckptdir), filename="step{step:06d}", every_n_train_steps=every,
                        **{"save_last": True, "save_top_k": -1, **checkpoint_params}, auto_insert_metric_name=False),
        ImageLogger(str(logdir), **image_params),
    ]
    if hasattr(model, "save_concept_file"):
        callbacks.append(ConceptCheckpoint(str(logdir / "concepts"), name, every, final_copy=str(final_concept)))
    else:  # training a base model: export it in the original layout
        callbacks.append(BaseModelExport(str(ckptdir), every))
    callbacks += [instantiate_from_config(c) for c in callback_configs.values()]
    logger = TensorBoardLogger(save_dir=str(logdir), name="tensorboard", version="")
    try:
        trainer = pl.Trainer(logger=logger, callbacks=callbacks, default_root_dir=str(logdir), **settings)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"lightning.trainer: {err}") from err

    if ckpt is not None:
        keep_newer_outputs(logdir, ckpt, final_concept)
    if trainer.is_global_zero:
        if not logdir.exists() and created is not None:
            created.append(logdir)
        cfgdir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
        OmegaConf.save(config, cfgdir / f"{stamp}-project.yaml")
        OmegaConf.save(OmegaConf.create({"lightning": lightning_config}), cfgdir / f"{stamp}-lightning.yaml")
        print(f"logging to {logdir}")

    trainer.fit(model, data, ckpt_path=str(ckpt) if ckpt else None)
    return trainer, model


def check_lightning_config(lightning_config) -> None:
    """Unknown keys of ``lightning:``, its trainer (checked against pl.Trainer's signature), its checkpoint
    settings and its callbacks are errors, found before the model is built."""
    check_config_keys("lightning", list(lightning_config.keys()),
                      {"trainer", "callbacks", "modelcheckpoint_step"},
                      {"modelcheckpoint": "checkpoints are written by step: use lightning.modelcheckpoint_step",
                       "logger": "the logger is TensorBoard, under the log folder"})
    trainer_keys = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    check_config_keys("lightning.trainer", list((lightning_config.get("trainer") or {}).keys()), trainer_keys,
                      {"gpus": "use --gpus on the command line"})
    step = lightning_config.get("modelcheckpoint_step") or {}
    check_config_keys("lightning.modelcheckpoint_step", list(step.keys()), {"params", "target"})
    known = set(inspect.signature(ModelCheckpoint.__init__).parameters) - {"self"}
    check_config_keys("lightning.modelcheckpoint_step.params", list((step.get("params") or {}).keys()), known)
    callbacks = lightning_config.get("callbacks") or {}
    for name, entry in callbacks.items():
        if name == "image_logger":  # built by main.py from its params; a target (old configs) is ignored
            check_config_keys("lightning.callbacks.image_logger", list((entry or {}).keys()), {"params", "target"})
        else:
            validate_config(entry, f"lightning.callbacks.{name}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
