"""The paper's claims, measured in the toy world: one command trains every method, samples, scores and judges.

    OMP_NUM_THREADS=1 python scripts/toy_claims.py --outdir outputs/toy_claims --readme-snippet

Defaults: training seeds 7,8,9 (one training per method and seed, --train_steps 300 as the toy configs), 8 images
per prompt (--n), 25 DDIM steps (--steps), guidance 4, tau 0.15, local locking. Claims (--claims, any subset of
a,b,c,d,e):

  a  Perfusion (beta 0.7) against the three baselines (trained keys, Textual Inversion, DreamBooth-style) on
     data/prompts/toy.txt: fidelity, alignment, their harmonic mean, the size of each learned concept;
  b  the beta sweep 0.5..0.8 traces a trade-off: fidelity rises and alignment falls as beta decreases;
  c  locked keys against trained keys: alignment at comparable fidelity (both swept over beta);
  d  toy_star and toy_dots, trained separately, appear together (both patterns found by the oracle) in
     data/prompts/toy_two.txt's prompts, with one shared gate (beta 0.6, tau 0.15, txt2img's two-concept default)
     and with per-concept gates (each concept's balanced beta from its own single-concept sweep);
  e  the mask loss on and off (data.params.train.params.use_masks=false).

How: training through main.py in subprocesses (configs/toy/perfusion_star.yaml, perfusion_star_trained_keys.yaml,
textual_inversion_star.yaml, dreambooth_star.yaml, perfusion_dots.yaml), into
<outdir>/train/<method>_seed<seed>_steps<N>/; a training whose concept file (or, for DreamBooth, the exported base
checkpoint of that step count) exists is skipped. Sampling and scoring are scripts/evaluate.py's (its Sweep,
--metric toy: fidelity = share of images in which the toy oracle finds the concept's pattern; alignment = share that
follow what the prompt asks besides the concept), into <outdir>/eval/...; evaluate.py reuses every image already
there, so an interrupted run resumes where it stopped.

Output in --outdir: claims.md (per claim a table, mean +- std over training seeds, the number of samples, and a
verdict computed from the numbers), claims.csv (one row per claim, row and quantity: mean, std, per-seed values,
samples), claim_<x>.png (PIL plots), timings.json (per stage), readme_snippet.md with --readme-snippet.

Verdict rule (every claim): each training seed gives one yes/no per part of the claim (e.g. "fidelity rises as
beta falls" for seed 8); all yes: "holds", all no: "does not hold", otherwise "mixed". The parts are named in the
verdict line with their counts. Std is over training seeds (ddof 1; none with one seed).

Cost, estimated from small runs measured on this repository's 2-core machine while it was shared (load ~5,
OMP_NUM_THREADS=1): a main.py start ~16 s; a Perfusion/Textual Inversion step ~0.5 s, a DreamBooth step ~0.85 s
(30- and 20-step runs); an image at 25 DDIM steps ~2.1 s (evaluate.py, 40 images in 84 s). The default run is 18
trainings of 300 steps (6 methods x 3 seeds: ~1 h) and 1,944 images (per seed: 3 sweeps of 4 betas x 5 prompts x
8 images for toy_star, trained keys and toy_dots, 40 each for Textual Inversion, DreamBooth and no mask, 48 with two
concepts: ~1.1 h), about 2.2 h of wall time, about as many CPU-hours of one core. A rerun reuses everything;
--claims b alone is 3 trainings and 480 images (~25 min). The smallest run (--train_steps 2 --n 1 --steps 2
--seeds 7) took 2 min for all five claims.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from scripts import evaluate as ev  # noqa: E402

INFERENCE_CONFIG = "configs/toy/inference.yaml"
BASE_CKPT = "ckpt/toy/base.safetensors"
PROMPTS = "data/prompts/toy.txt"
TWO_CONCEPT_PROMPTS = "data/prompts/toy_two.txt"
BETAS = (0.5, 0.6, 0.7, 0.8)
TAU = 0.15
BETA = 0.7  # the single-concept default of perfusion_txt2img.py (perfusion.roe.INFERENCE_BETA)
SHARED_GATE = (0.6, 0.15)  # its default for several concepts (MULTI_CONCEPT_BETA, INFERENCE_TAU)
PAPER_CONCEPT_BYTES = 100 * 1024  # "100KB per concept" (Perfusion, abstract)
ALL_CLAIMS = "abcde"


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    configs: tuple[str, ...]
    overrides: tuple[str, ...] = ()
    concept: str = "toy_star"  # the toy concept (oracle pattern, training data, run name)
    base_model: bool = False  # DreamBooth-style: a fine-tuned base checkpoint instead of a concept file


METHODS = {m.key: m for m in (
    Method("perfusion", "Perfusion (locked keys)", ("configs/toy/perfusion_star.yaml",)),
    Method("trained_keys", "trained keys", ("configs/toy/perfusion_star.yaml",
                                            "configs/toy/perfusion_star_trained_keys.yaml")),
    Method("textual_inversion", "Textual Inversion", ("configs/toy/textual_inversion_star.yaml",)),
    Method("dreambooth", "DreamBooth-style", ("configs/toy/dreambooth_star.yaml",), base_model=True),
    Method("no_mask", "Perfusion, no mask loss", ("configs/toy/perfusion_star.yaml",),
           ("data.params.train.params.use_masks=false",)),
    Method("dots", "Perfusion toy_dots", ("configs/toy/perfusion_dots.yaml",), concept="toy_dots"),
)}
CLAIM_METHODS = {"a": ("perfusion", "trained_keys", "textual_inversion", "dreambooth"), "b": ("perfusion",),
                 "c": ("perfusion", "trained_keys"), "d": ("perfusion", "dots"), "e": ("perfusion", "no_mask")}
CLAIM_TITLES = {
    "a": "(a) Perfusion against the baselines (beta 0.7, tau 0.15)",
    "b": "(b) The beta sweep traces a fidelity/alignment trade-off",
    "c": "(c) Locked keys against trained keys: alignment at comparable fidelity",
    "d": "(d) Two concepts trained separately appear together",
    "e": "(e) The mask loss on and off",
}


# ----- stages and their times ---------------------------------------------------------------------------------
class Timer:
    def __init__(self):
        self.stages: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start

    def total(self) -> float:
        return time.perf_counter() - self.start


# ----- training -----------------------------------------------------------------------------------------------
def run_dir(outdir: Path, method: Method, seed: int, train_steps: int) -> Path:
    return Path(outdir) / "train" / f"{method.key}_seed{seed}_steps{train_steps}"


def training_command(method: Method, seed: int, train_steps: int, basedir: Path, extra: list[str] = ()) -> list[str]:
    """main.py's command line for one training (run from the repository root)."""
    return [sys.executable, str(REPO / "main.py"), "--name", method.concept, "--base", *method.configs,
            "--basedir", str(basedir), "-t", "True", "--seed", str(seed), *method.overrides,
            f"lightning.trainer.max_steps={train_steps}", *extra]


def trained_file(method: Method, basedir: Path, train_steps: int) -> Path | None:
    """The finished training's concept file (main.py writes <basedir>/<name>.safetensors at the end), or for a base
    model the exported base-last.safetensors whose step is train_steps; None when there is none yet."""
    basedir = Path(basedir)
    if not method.base_model:
        path = basedir / f"{method.concept}.safetensors"
        return path if path.is_file() else None
    from safetensors import safe_open

    for path in sorted(basedir.glob(f"*_{method.concept}/checkpoints/base-last.safetensors"),
                       key=lambda p: p.stat().st_mtime, reverse=True):
        with safe_open(str(path), "pt") as handle:
            if (handle.metadata() or {}).get("global_step") == str(train_steps):
                return path
    return None


def train(method: Method, seed: int, train_steps: int, outdir: Path, extra: list[str] = ()) -> tuple[Path, bool]:
    """(the learned file, whether it was trained now); a finished training is reused."""
    basedir = run_dir(outdir, method, seed, train_steps)
    done = trained_file(method, basedir, train_steps)
    if done is not None:
        print(f"reusing {done}", flush=True)
        return done, False
    data = REPO / "training_data" / method.concept
    if not (data / "mask").is_dir():
        from data.toy_world import write_concept

        write_concept(method.concept, data)
    basedir.mkdir(parents=True, exist_ok=True)
    command = training_command(method, seed, train_steps, basedir, extra)
    print("$ " + " ".join(command[1:]), flush=True)
    log = basedir / "train.log"
    with open(log, "w") as handle:
        result = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    done = trained_file(method, basedir, train_steps)
    if result.returncode != 0 or done is None:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"training {method.key} seed {seed} failed (exit {result.returncode}), log {log}:\n{tail}")
    return done, True


# ----- evaluation (scripts/evaluate.py) -----------------------------------------------------------------------
def evaluate_argv(args, outdir: Path, prompts: str, personalized: str, betas=(BETA,), tau: float = TAU,
                  concepts: str | None = None) -> list[str]:
    argv = ["--personalized_ckpt", personalized, "--metric", "toy", "--config", args.config, "--ckpt", args.ckpt,
            "--prompts", prompts, "--beta", ",".join(f"{b:g}" for b in betas), "--tau", f"{tau:g}",
            "--global_locking", "off", "--n", str(args.n), "--steps", str(args.steps), "--scale", f"{args.scale:g}",
            "--seed", str(args.eval_seed), "--batch_size", str(args.batch_size), "--outdir", str(outdir)]
    if args.device:
        argv += ["--device", args.device]
    return argv + (["--toy_concept", concepts] if concepts else [])


def read_results(path: Path) -> list[dict]:
    def value(text: str):
        if text in ("True", "False"):
            return text == "True"
        try:
            return float(text)
        except ValueError:
            return text

    with open(path, newline="") as handle:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def judged_prompts(superclass_prompts: list[str]) -> int:
    """How many prompts the alignment judges (those that ask for something besides the concept)."""
    from data.toy_oracle import Reading

    return sum(ev.toy_alignment(Reading(None, []), p) is not None for p in superclass_prompts)


def evaluate_concept(args, path: Path, concept: str, outdir: Path, betas=(BETA,)) -> list[dict]:
    """scripts/evaluate.py --metric toy on one concept file: one row per beta (results.csv's)."""
    opt = ev.get_parser().parse_args(evaluate_argv(args, outdir, PROMPTS, str(path), betas, concepts=concept))
    ev.evaluate(opt)
    rows = read_results(Path(outdir) / "results.csv")
    return sorted(rows, key=lambda r: r["beta"])


class GatedSweep(ev.Sweep):
    """evaluate.py's Sweep with a fixed gate per concept (``gates``: betas, taus), recorded with every image."""

    gates: tuple[list[float], list[float]] | None = None

    def install(self, beta, tau):
        if self.gates is None:
            return super().install(beta, tau)
        betas, taus = self.gates
        self.model.load_concepts(self.concepts, beta=list(betas), tau=list(taus), placeholders=self.placeholders)

    def signature(self, setting, prompt_index, j):
        record = json.loads(super().signature(setting, prompt_index, j))
        record["per_concept_gates"] = self.gates
        return json.dumps(record, sort_keys=True)


def sample_and_read(args, outdir: Path, prompts_file: str, paths: list[Path], names: list[str],
                    gates=None, words: str | None = None, ckpt: str | None = None) -> dict:
    """Sample prompts through evaluate.py's Sweep and read every image with the toy oracle: the share of images
    with each concept, with all of them, and (evaluate.py's alignment) following the rest of the prompt.
    ``words`` (no concept files): the words that name the concept in a fine-tuned base model ("sks star")."""
    import torch
    from omegaconf import OmegaConf

    from data.toy_oracle import concept_found, read_image
    from data.toy_world import CONCEPTS
    from scripts.perfusion_txt2img import check_prompts, fill_prompt

    opt = ev.get_parser().parse_args(evaluate_argv(args, outdir, prompts_file, ",".join(map(str, paths)) or "-"))
    if ckpt:
        opt.ckpt = str(ckpt)
    config = OmegaConf.load(opt.config)
    ev.fill_image_geometry(opt, config)
    prompts = ev.read_prompt_file(prompts_file)
    check_prompts(prompts, len(paths) or 1)
    concepts = ev.load_and_check_concepts([str(p) for p in paths], config) if paths else []
    superclasses = [CONCEPTS[n]["superclass"] for n in names]
    superclass_prompts = [fill_prompt(p, superclasses) for p in prompts]
    if words:
        prompts = [fill_prompt(p, [words]) for p in prompts]
    device = torch.device(opt.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sweep = GatedSweep(opt, config, [str(p) for p in paths], concepts, prompts, device)
    sweep.gates = [list(g) for g in gates] if gates else None
    # the setting names the folder and the records; per-concept gates are recorded as well (GatedSweep)
    setting = ((gates[0][0], gates[1][0]) if gates else SHARED_GATE if len(paths) > 1 else (BETA, TAU)) + (False,)
    images = sweep.run(setting)
    per_prompt = ev.score_setting(opt, images, superclass_prompts, {}, {"toy_names": names})
    row = ev.summarise(setting, per_prompt, opt, len(prompts))
    readings = [read_image(image) for prompt_images in images for image in prompt_images]
    found = {n: float(np.mean([concept_found(r, n) for r in readings])) for n in names}
    row.update({f"found_{n}": v for n, v in found.items()})
    row["all_found"] = float(np.mean([all(concept_found(r, n) for n in names) for r in readings]))
    row["images"] = len(readings)
    row["judged"] = judged_prompts(superclass_prompts) * opt.n
    ev.write_csv([row], Path(outdir) / "results.csv")
    ev.write_sheet([images], [row], prompts, Path(outdir) / "sheet.png")
    print(f"{outdir}: generated {sweep.generated} images, reused {sweep.reused}", flush=True)
    return row


# ----- numbers: aggregation and verdicts ----------------------------------------------------------------------
def harmonic(f: float, a: float) -> float:
    """Harmonic mean of two shares (0 when both are 0; NaN when either is)."""
    if not (math.isfinite(f) and math.isfinite(a)):
        return float("nan")
    return 2 * f * a / (f + a) if f + a > 0 else 0.0


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof 1; NaN with one value) of the finite values."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if finite.size == 0:
        return float("nan"), float("nan")
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else float("nan")


def verdict(flags: list[bool]) -> str:
    """All parts in all seeds: holds; none: does not hold; otherwise mixed (no flags: not measured)."""
    flags = [bool(f) for f in flags]
    if not flags:
        return "not measured"
    return "holds" if all(flags) else "does not hold" if not any(flags) else "mixed"


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys on xs (finite pairs; NaN with fewer than two)."""
    pairs = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 2:
        return float("nan")
    x, y = np.asarray(pairs, dtype=float).T
    return float(np.polyfit(x, y, 1)[0]) if np.ptp(x) > 0 else float("nan")


def monotone(values: list[float]) -> str:
    """'rising', 'falling', 'flat' (non-strictly, in the given order) or 'not monotone'."""
    steps = np.diff(np.asarray(values, dtype=float))
    if not np.isfinite(steps).all():
        return "not monotone"
    if (steps == 0).all():
        return "flat"
    if (steps >= 0).all():
        return "rising" + ("" if (steps > 0).all() else " (not strictly)")
    if (steps <= 0).all():
        return "falling" + ("" if (steps < 0).all() else " (not strictly)")
    return "not monotone"


def alignment_at_matched_fidelity(first: list[tuple[float, float]], second: list[tuple[float, float]],
                                  grid: int = 5) -> tuple[float, str]:
    """Mean alignment difference (first - second) at equal fidelity: each curve's alignment, interpolated over
    fidelity (points: (fidelity, alignment), e.g. one per beta), on a grid over the fidelity range both cover. When
    the ranges do not meet, the difference of the two points with the closest fidelities, and the gap."""
    def curve(points):
        points = [(f, a) for f, a in points if math.isfinite(f) and math.isfinite(a)]
        by_f: dict[float, list[float]] = {}
        for f, a in points:
            by_f.setdefault(f, []).append(a)
        fs = sorted(by_f)
        return np.asarray(fs), np.asarray([np.mean(by_f[f]) for f in fs])

    (f1, a1), (f2, a2) = curve(first), curve(second)
    if not len(f1) or not len(f2):
        return float("nan"), "no finite points"
    low, high = max(f1.min(), f2.min()), min(f1.max(), f2.max())
    if low <= high:
        xs = np.linspace(low, high, grid) if high > low else np.asarray([low])
        return float(np.mean(np.interp(xs, f1, a1) - np.interp(xs, f2, a2))), f"fidelity {low:.2f}-{high:.2f}"
    i, j = min(((i, j) for i in range(len(f1)) for j in range(len(f2))), key=lambda ij: abs(f1[ij[0]] - f2[ij[1]]))
    return float(a1[i] - a2[j]), f"ranges do not meet: nearest fidelities {f1[i]:.2f} / {f2[j]:.2f}"


class Numbers:
    """data[claim][row][quantity][seed] = value, in insertion order; and the samples behind each row."""

    def __init__(self):
        self.data: dict[str, dict[str, dict[str, dict[int, float]]]] = {}
        self.samples: dict[tuple[str, str], dict[int, int]] = {}
        self.threshold = 0.5  # claim (d): share of samples with both concepts that counts as "appear together"

    def put(self, claim: str, row: str, seed: int, samples: int | None = None, **quantities: float) -> None:
        for quantity, value in quantities.items():
            self.data.setdefault(claim, {}).setdefault(row, {}).setdefault(quantity, {})[seed] = float(value)
        if samples is not None:
            self.samples.setdefault((claim, row), {})[seed] = int(samples)

    def get(self, claim: str, row: str, quantity: str) -> dict[int, float]:
        return self.data.get(claim, {}).get(row, {}).get(quantity, {})

    def seeds(self, claim: str) -> list[int]:
        return sorted({s for rows in self.data.get(claim, {}).values() for q in rows.values() for s in q})

    def rows(self) -> list[dict]:
        """One dict per claim, row and quantity: mean, std over seeds, the per-seed values, samples."""
        out = []
        for claim, rows in self.data.items():
            for row, quantities in rows.items():
                samples = self.samples.get((claim, row), {})
                for quantity, by_seed in quantities.items():
                    mean, std = mean_std(list(by_seed.values()))
                    out.append({"claim": claim, "row": row, "quantity": quantity, "mean": mean, "std": std,
                                "seeds": len(by_seed), "samples_per_seed": max(samples.values(), default=""),
                                "samples": sum(samples.get(s, 0) for s in by_seed) if samples else "",
                                "per_seed": ";".join(f"{s}:{v:.4g}" for s, v in sorted(by_seed.items()))})
        return out


def _per_seed(numbers: Numbers, claim: str, row: str, quantity: str, seeds: list[int]) -> list[float]:
    values = numbers.get(claim, row, quantity)
    return [values.get(s, float("nan")) for s in seeds]


def _count(flags: list[bool]) -> str:
    return f"{sum(flags)}/{len(flags)} seeds"


def verdicts(numbers: Numbers, claim: str) -> list[str]:
    """The claim's verdict lines, computed from the per-seed numbers (see the module doc for the rule)."""
    seeds = numbers.seeds(claim)
    if not seeds:
        return ["**verdict: not measured**"]
    lines = []
    if claim == "a":
        perfusion = METHODS["perfusion"].label
        for key in CLAIM_METHODS["a"][1:]:
            label = METHODS[key].label
            if not numbers.get("a", label, "balance"):
                continue
            p, b = (_per_seed(numbers, "a", r, "balance", seeds) for r in (perfusion, label))
            flags = [x > y for x, y in zip(p, b)]
            lines.append(f"**Perfusion balances fidelity and alignment better than {label} "
                         f"(harmonic mean higher): {verdict(flags)}** ({_count(flags)})")
        size = _per_seed(numbers, "a", perfusion, "file_KB", seeds)
        dream = _per_seed(numbers, "a", METHODS["dreambooth"].label, "file_KB", seeds)
        flags = [s * 1024 <= PAPER_CONCEPT_BYTES for s in size]
        if any(math.isfinite(d) for d in dream):
            flags += [s < d for s, d in zip(size, dream) if math.isfinite(d)]
            ratio = np.nanmean(dream) / np.nanmean(size)
            extra = f"; DreamBooth's checkpoint is {ratio:,.0f}x larger"
        else:
            extra = ""
        lines.append(f"**A Perfusion concept takes at most 100 KB and less than a DreamBooth model: "
                     f"{verdict(flags)}** (mean {np.nanmean(size):.1f} KB{extra})")
    elif claim == "b":
        rows = list(numbers.data["b"])
        betas = [float(r.split()[1]) for r in rows]
        f_flags, a_flags = [], []
        for s in seeds:
            f = [numbers.get("b", r, "fidelity").get(s, float("nan")) for r in rows]
            a = [numbers.get("b", r, "alignment").get(s, float("nan")) for r in rows]
            f_flags.append(slope(betas, f) < 0)  # fidelity rises as beta decreases
            a_flags.append(slope(betas, a) > 0)  # alignment falls as beta decreases
        order = sorted(range(len(rows)), key=lambda i: -betas[i])  # beta decreasing
        mean_f = [mean_std(list(numbers.get("b", rows[i], "fidelity").values()))[0] for i in order]
        mean_a = [mean_std(list(numbers.get("b", rows[i], "alignment").values()))[0] for i in order]
        per_seed_mono = []
        for s in seeds:
            f = [numbers.get("b", rows[i], "fidelity").get(s, float("nan")) for i in order]
            a = [numbers.get("b", rows[i], "alignment").get(s, float("nan")) for i in order]
            per_seed_mono.append(monotone(f).startswith("rising") and monotone(a).startswith("falling"))
        lines.append(f"**Fidelity rises and alignment falls as beta decreases: {verdict(f_flags + a_flags)}** "
                     f"(least-squares trend over beta: fidelity rises in {_count(f_flags)}, alignment falls in "
                     f"{_count(a_flags)})")
        sweep = ", ".join(f"{betas[i]:g}" for i in order)
        lines.append(f"Monotone? Mean over seeds, beta {sweep}: fidelity {monotone(mean_f)} "
                     f"({', '.join(f'{v:.3f}' for v in mean_f)}), alignment {monotone(mean_a)} "
                     f"({', '.join(f'{v:.3f}' for v in mean_a)}); both monotone in the claimed direction in "
                     f"{_count(per_seed_mono)}")
    elif claim == "c":
        diffs = _per_seed(numbers, "c", "locked - trained keys at matched fidelity", "alignment_difference", seeds)
        flags = [d > 0 for d in diffs]
        mean, std = mean_std(diffs)
        lines.append(f"**Locked keys align better than trained keys at comparable fidelity: {verdict(flags)}** "
                     f"(alignment difference {fmt(mean, std)}; positive in {_count(flags)})")
    elif claim == "d":
        threshold = numbers.threshold
        for row in numbers.data["d"]:
            values = _per_seed(numbers, "d", row, "both_found", seeds)
            flags = [v >= threshold for v in values]
            mean, std = mean_std(values)
            lines.append(f"**Both concepts appear together in at least {threshold:.0%} of samples, {row}: "
                         f"{verdict(flags)}** (both found in {fmt(mean, std, percent=True)}; "
                         f"at least one sample with both in {_count([v > 0 for v in values])})")
        rows = list(numbers.data["d"])
        if len(rows) == 2:
            shared, own = (_per_seed(numbers, "d", r, "both_found", seeds) for r in rows)
            flags = [o > s for s, o in zip(shared, own)]
            lines.append(f"**Per-concept gates give more samples with both concepts than one shared gate: "
                         f"{verdict(flags)}** ({_count(flags)})")
    elif claim == "e":
        on, off = (METHODS["perfusion"].label, METHODS["no_mask"].label)
        a_flags = [x > y for x, y in zip(*(_per_seed(numbers, "e", r, "alignment", seeds) for r in (on, off)))]
        f_flags = [x >= y for x, y in zip(*(_per_seed(numbers, "e", r, "fidelity", seeds) for r in (on, off)))]
        lines.append(f"**The mask loss improves alignment without losing fidelity: {verdict(a_flags + f_flags)}** "
                     f"(alignment higher with masks in {_count(a_flags)}, fidelity at least as high in "
                     f"{_count(f_flags)})")
    return lines


# ----- report: markdown, CSV, plots ---------------------------------------------------------------------------
def fmt(mean: float, std: float, percent: bool = False) -> str:
    if not math.isfinite(mean):
        return "-"
    scale, unit = (100, " %") if percent else (1, "")
    text = f"{mean * scale:.1f}" if percent else f"{mean:.3f}"
    if math.isfinite(std):
        text += f" ± {std * scale:.1f}" if percent else f" ± {std:.3f}"
    return text + unit


PERCENT_QUANTITIES = {"fidelity", "alignment", "balance", "both_found", "found_toy_star", "found_toy_dots"}
QUANTITY_LABELS = {"fidelity": "fidelity (concept found)", "alignment": "alignment (rest of prompt followed)",
                   "balance": "harmonic mean", "file_KB": "concept size (KB)", "both_found": "both concepts found",
                   "found_toy_star": "toy_star found", "found_toy_dots": "toy_dots found",
                   "alignment_difference": "alignment difference", "beta_toy_star": "beta toy_star",
                   "beta_toy_dots": "beta toy_dots"}


def markdown_table(numbers: Numbers, claim: str) -> list[str]:
    rows = numbers.data.get(claim, {})
    quantities = list(dict.fromkeys(q for r in rows.values() for q in r))
    header = ["", *[QUANTITY_LABELS.get(q, q) for q in quantities], "samples per seed x seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, values in rows.items():
        cells = []
        for q in quantities:
            mean, std = mean_std(list(values.get(q, {}).values()))
            if q == "file_KB":
                cells.append(f"{mean:,.1f}" if math.isfinite(mean) else "-")
            else:
                cells.append(fmt(mean, std, percent=q in PERCENT_QUANTITIES))
        samples = numbers.samples.get((claim, row), {})
        seeds = max((len(v) for v in values.values()), default=0)
        cells.append(f"{max(samples.values())} x {seeds}" if samples else f"- x {seeds}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def report_markdown(numbers: Numbers, claims: str, settings: str, notes: dict[str, str]) -> str:
    lines = []
    for claim in claims:
        if claim not in numbers.data:
            continue
        lines += [f"### {CLAIM_TITLES[claim]}", ""]
        if notes.get(claim):
            lines += [notes[claim], ""]
        lines += markdown_table(numbers, claim) + [""]
        lines += [f"- {v}" for v in verdicts(numbers, claim)] + [""]
    lines += [f"Mean ± std over training seeds (ddof 1). {settings}", ""]
    return "\n".join(lines)


def write_csv(numbers: Numbers, path: Path) -> None:
    rows = numbers.rows()
    fields = ["claim", "row", "quantity", "mean", "std", "seeds", "samples_per_seed", "samples", "per_seed"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        for claim in numbers.data:
            for line in verdicts(numbers, claim):
                writer.writerow({"claim": claim, "row": "verdict", "quantity": line.replace("**", "")})


COLOURS = [(40, 80, 220), (230, 120, 0), (0, 150, 70), (200, 30, 60), (120, 60, 180), (90, 90, 90)]


def chart(path: Path, title: str, x_label: str, y_label: str, series: list[dict], x_ticks: list[str] | None = None,
          width: int = 800, height: int = 520, y_range: tuple[float, float] | None = (0.0, 1.0),
          x_range: tuple[float, float] | None = None) -> None:
    """A PIL chart. ``series``: dicts with label, points [(x, y, xerr, yerr)] (errors may be NaN), line (bool).
    With ``x_ticks`` the x values are category positions 0, 1, ..."""
    left, right, top, bottom = 70, 250, 48, 60
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    points = [p for s in series for p in s["points"] if math.isfinite(p[0]) and math.isfinite(p[1])]
    xs = [p[0] for p in points] or [0.0]
    if x_ticks is not None:
        x0, x1 = -0.6, len(x_ticks) - 0.4
    elif x_range is not None:
        x0, x1 = x_range[0] - 0.03, x_range[1] + 0.03
    else:
        pad = (max(xs) - min(xs)) * 0.1 or 0.05
        x0, x1 = min(xs) - pad, max(xs) + pad
    if y_range is None:
        ys = [p[1] for p in points] or [0.0]
        pad = (max(ys) - min(ys)) * 0.1 or 0.05
        y0, y1 = min(ys) - pad, max(ys) + pad
    else:
        y0, y1 = y_range[0] - 0.03, y_range[1] + 0.03
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(x, y):
        return left + plot_w * (x - x0) / (x1 - x0), top + plot_h * (1 - (y - y0) / (y1 - y0))

    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=(0, 0, 0))
    ya, yb = y_range if y_range is not None else (y0, y1)
    for k in range(5):
        vy = ya + (yb - ya) * k / 4
        _, py = xy(x0, vy)
        draw.line([(left, py), (left + plot_w, py)], fill=(230, 230, 230))
        draw.text((8, py - 6), f"{vy:.2f}", fill=(0, 0, 0))
    if x_ticks is not None:
        for i, tick in enumerate(x_ticks):
            px, _ = xy(i, y0)
            draw.text((px - draw.textlength(tick) / 2, top + plot_h + 6), tick, fill=(0, 0, 0))
    else:
        xa, xb = x_range if x_range is not None else (x0, x1)
        for k in range(5):
            vx = xa + (xb - xa) * k / 4
            px, _ = xy(vx, y0)
            draw.line([(px, top), (px, top + plot_h)], fill=(230, 230, 230))
            draw.text((px - 14, top + plot_h + 6), f"{vx:.2f}", fill=(0, 0, 0))
    draw.text((left, 8), title, fill=(0, 0, 0))
    draw.text((left, 26), f"y: {y_label}", fill=(60, 60, 60))
    draw.text((left + plot_w // 2 - draw.textlength(x_label) / 2, height - 24), x_label, fill=(0, 0, 0))
    for k, s in enumerate(series):
        colour = COLOURS[k % len(COLOURS)]
        finite = [p for p in s["points"] if math.isfinite(p[0]) and math.isfinite(p[1])]
        if s.get("line") and len(finite) > 1:
            draw.line([xy(p[0], p[1]) for p in finite], fill=colour, width=2)
        for x, y, xerr, yerr in finite:
            px, py = xy(x, y)
            if math.isfinite(yerr) and yerr > 0:
                draw.line([xy(x, y - yerr), xy(x, y + yerr)], fill=colour, width=1)
            if math.isfinite(xerr) and xerr > 0:
                draw.line([xy(x - xerr, y), xy(x + xerr, y)], fill=colour, width=1)
            draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=colour)
        draw.rectangle([width - right + 12, top + 18 * k + 4, width - right + 22, top + 18 * k + 14], fill=colour)
        draw.text((width - right + 28, top + 18 * k + 2), s["label"][:36], fill=(0, 0, 0))
    image.save(path)


def _point(numbers, claim, row, xq, yq, x=None):
    mx, sx = mean_std(list(numbers.get(claim, row, xq).values())) if x is None else (x, float("nan"))
    my, sy = mean_std(list(numbers.get(claim, row, yq).values()))
    return (mx, my, sx, sy)


def samples_note(numbers: Numbers, claim: str) -> str:
    per = {max(v.values()) for (c, _), v in numbers.samples.items() if c == claim and v}
    seeds = len(numbers.seeds(claim))
    return f"n = {'/'.join(str(p) for p in sorted(per)) or '?'} images per point per seed x {seeds} seed(s)"


def plots(numbers: Numbers, outdir: Path) -> list[Path]:
    """claim_<x>.png per measured claim; error bars: std over training seeds."""
    written = []
    for claim in numbers.data:
        path = Path(outdir) / f"claim_{claim}.png"
        title = f"{CLAIM_TITLES[claim]}  ({samples_note(numbers, claim)})"
        rows = list(numbers.data[claim])
        if claim == "a":
            series = [{"label": r, "points": [_point(numbers, "a", r, "fidelity", "alignment")]} for r in rows]
            chart(path, title, "fidelity (toy oracle: concept found)", "alignment (rest of the prompt followed)",
                  series, x_range=(0, 1))
        elif claim == "b":
            betas = [float(r.split()[1]) for r in rows]
            series = [{"label": q, "line": True, "points": [_point(numbers, "b", r, q, q, x=b)
                                                            for r, b in zip(rows, betas)]}
                      for q in ("fidelity", "alignment")]
            chart(path, title, "beta (tau 0.15)", "share of images", series, x_range=(min(betas), max(betas)))
        elif claim == "c":
            series = []
            for prefix in ("locked keys", "trained keys"):
                points = [_point(numbers, "c", r, "fidelity", "alignment") for r in rows if r.startswith(prefix)]
                series.append({"label": f"{prefix} (beta 0.5-0.8)", "line": True,
                               "points": sorted(points, key=lambda p: p[0])})
            chart(path, title, "fidelity (concept found)", "alignment (rest of the prompt followed)", series,
                  x_range=(0, 1))
        elif claim in ("d", "e"):
            quantities = (["both_found", "found_toy_star", "found_toy_dots", "alignment"] if claim == "d"
                          else ["fidelity", "alignment"])
            series = []
            for k, r in enumerate(rows):
                points = []
                for i, q in enumerate(quantities):
                    _, my, _, sy = _point(numbers, claim, r, q, q)
                    points.append((i + (k - (len(rows) - 1) / 2) * 0.2, my, float("nan"), sy))
                series.append({"label": r, "points": points})
            chart(path, title, "", "share of images", series, x_ticks=[QUANTITY_LABELS[q][:24] for q in quantities])
        written.append(path)
    return written


def write_report(numbers: Numbers, claims: str, outdir: Path, command: str, settings: str,
                 notes: dict[str, str] | None = None) -> list[Path]:
    """claims.md (the command, per claim a table and its verdicts), claims.csv and the plots; returns the paths."""
    outdir = Path(outdir)
    table = report_markdown(numbers, claims, settings, notes or {})
    (outdir / "claims.md").write_text(f"# Perfusion's claims in the toy world\n\n```\n{command}\n```\n\n{table}")
    write_csv(numbers, outdir / "claims.csv")
    return [outdir / "claims.md", outdir / "claims.csv", *plots(numbers, outdir)]


def write_readme_snippet(outdir: Path, command: str, seconds: float) -> Path:
    """readme_snippet.md: a markdown block to paste into README.md (the command and claims.md's tables)."""
    table = (Path(outdir) / "claims.md").read_text().split("```\n\n", 1)[-1]
    path = Path(outdir) / "readme_snippet.md"
    path.write_text(f"```\n{command}\n```\n\n{table}\nWall time: {seconds / 60:.1f} min on this machine.\n")
    return path


# ----- the run ------------------------------------------------------------------------------------------------
def parse_claims(text: str) -> str:
    claims = "".join(c for c in text.replace(",", "").replace(" ", "").lower())
    bad = sorted(set(claims) - set(ALL_CLAIMS))
    if bad or not claims:
        raise SystemExit(f"--claims {text}: give letters among a,b,c,d,e (e.g. --claims a,d)")
    return "".join(c for c in ALL_CLAIMS if c in claims)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outdir", default="outputs/toy_claims")
    p.add_argument("--seeds", default="7,8,9", help="training seeds, comma separated (one training per method each)")
    p.add_argument("--claims", default="a,b,c,d,e", help="which claims to measure (subset of a,b,c,d,e)")
    p.add_argument("--n", type=int, default=8, help="images per prompt and setting")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps per image")
    p.add_argument("--train_steps", type=int, default=300, help="optimizer steps per training (the configs' 300)")
    p.add_argument("--scale", type=float, default=4.0, help="classifier-free guidance scale")
    p.add_argument("--eval_seed", type=int, default=42, help="prompt i samples with seed eval_seed + i")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--d_threshold", type=float, default=0.5,
                   help="claim (d) holds for a seed when both concepts are found in at least this share of samples")
    p.add_argument("--config", default=INFERENCE_CONFIG)
    p.add_argument("--ckpt", default=BASE_CKPT)
    p.add_argument("--device", default=None)
    p.add_argument("--train_override", action="append", default=[],
                   help="extra main.py override for every training (repeatable), e.g. lightning.trainer.accelerator=gpu")
    p.add_argument("--readme-snippet", dest="readme_snippet", action="store_true",
                   help="also write readme_snippet.md: a markdown block with the command and the table")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    claims = parse_claims(args.claims)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    outdir = Path(args.outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    numbers = Numbers()
    numbers.threshold = args.d_threshold
    needed = list(dict.fromkeys(m for c in claims for m in CLAIM_METHODS[c]))
    print(f"claims {','.join(claims)}: methods {', '.join(needed)}; seeds {seeds}; {args.train_steps} training "
          f"steps; {args.n} images per prompt, {args.steps} sampling steps", flush=True)

    notes: dict[str, str] = {}
    evaluated: dict[tuple[str, int], list[dict]] = {}
    star_prompts = ev.read_prompt_file(PROMPTS)
    from scripts.perfusion_txt2img import fill_prompt

    judged = judged_prompts([fill_prompt(p, ["star"]) for p in star_prompts])
    per_setting = args.n * len(star_prompts)
    sweep_methods = {m for c in claims for m in {"b": ["perfusion"], "c": ["perfusion", "trained_keys"],
                                                 "d": ["perfusion", "dots"]}.get(c, [])}
    for seed in seeds:
        files: dict[str, Path] = {}
        for key in needed:
            with timer.stage(f"train {key}"):
                files[key], _ = train(METHODS[key], seed, args.train_steps, outdir, args.train_override)
        for key in needed:
            method = METHODS[key]
            folder = outdir / "eval" / f"{key}_seed{seed}_steps{args.train_steps}"
            with timer.stage(f"evaluate {key}"):
                if method.base_model:
                    from omegaconf import OmegaConf

                    words = OmegaConf.load(REPO / method.configs[-1]).data.params.train.params.placeholder_token
                    row = sample_and_read(args, folder, PROMPTS, [], [method.concept], words=words, ckpt=files[key])
                    evaluated[key, seed] = [row]
                else:
                    betas = BETAS if key in sweep_methods else (BETA,)
                    evaluated[key, seed] = evaluate_concept(args, files[key], method.concept, folder, betas)
        rows = {key: {r["beta"]: r for r in evaluated[key, seed]} for key in needed}

        if "a" in claims:
            for key in CLAIM_METHODS["a"]:
                r = rows[key][BETA] if not METHODS[key].base_model else evaluated[key, seed][0]
                numbers.put("a", METHODS[key].label, seed, samples=per_setting, fidelity=r["fidelity"],
                            alignment=r["alignment"], balance=harmonic(r["fidelity"], r["alignment"]),
                            file_KB=files[key].stat().st_size / 1024)
        if "b" in claims:
            for beta in BETAS:
                r = rows["perfusion"][beta]
                numbers.put("b", f"beta {beta:g}", seed, samples=per_setting, fidelity=r["fidelity"],
                            alignment=r["alignment"])
        if "c" in claims:
            curves = {}
            for key, prefix in (("perfusion", "locked keys"), ("trained_keys", "trained keys")):
                for beta in BETAS:
                    r = rows[key][beta]
                    numbers.put("c", f"{prefix}, beta {beta:g}", seed, samples=per_setting,
                                fidelity=r["fidelity"], alignment=r["alignment"])
                curves[key] = [(rows[key][b]["fidelity"], rows[key][b]["alignment"]) for b in BETAS]
            difference, how = alignment_at_matched_fidelity(curves["perfusion"], curves["trained_keys"])
            numbers.put("c", "locked - trained keys at matched fidelity", seed, alignment_difference=difference)
            notes.setdefault("c", "Alignment difference: each curve's alignment interpolated over fidelity on the "
                                  "fidelity range both cover (else the two closest points). Per seed: ")
            notes["c"] += f"{'' if notes['c'].endswith(': ') else '; '}seed {seed}: {how}"
        if "e" in claims:
            for key in CLAIM_METHODS["e"]:
                r = rows[key][BETA]
                numbers.put("e", METHODS[key].label, seed, samples=per_setting, fidelity=r["fidelity"],
                            alignment=r["alignment"])
        if "d" in claims:
            own = {key: float(evaluated[key, seed][ev.select_balanced(evaluated[key, seed])]["beta"])
                   for key in ("perfusion", "dots")}
            notes["d"] = ("Per-concept gates: each concept's balanced beta (evaluate.py's --select-beta rule) from "
                          f"its own single-concept sweep over beta {BETAS[0]:g}-{BETAS[-1]:g} on {PROMPTS}, tau "
                          f"{TAU:g}; prompts: {TWO_CONCEPT_PROMPTS} ({{1}} toy_star, {{2}} toy_dots).")
            pair = [files["perfusion"], files["dots"]]
            names = [METHODS["perfusion"].concept, METHODS["dots"].concept]
            for label, gates in ((f"shared gate (beta {SHARED_GATE[0]:g}, tau {SHARED_GATE[1]:g})", None),
                                 ("per-concept gates (balanced betas)",
                                  ([own["perfusion"], own["dots"]], [TAU, TAU]))):
                mode = "shared" if gates is None else "per_concept"
                with timer.stage(f"evaluate two concepts ({mode})"):
                    r = sample_and_read(args, outdir / "eval" / f"two_{mode}_seed{seed}_steps{args.train_steps}",
                                        TWO_CONCEPT_PROMPTS, pair, names, gates=gates)
                numbers.put("d", label, seed, samples=r["images"], both_found=r["all_found"],
                            found_toy_star=r["found_toy_star"], found_toy_dots=r["found_toy_dots"],
                            alignment=r["alignment"])
                if gates is not None:
                    numbers.put("d", label, seed, beta_toy_star=own["perfusion"], beta_toy_dots=own["dots"])

    with timer.stage("report"):
        command = "python scripts/toy_claims.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        settings = (f"{len(star_prompts)} prompts of {PROMPTS} ({judged} judged for alignment) x {args.n} images "
                    f"per setting; {args.steps} DDIM steps, guidance {args.scale:g}, sampling seeds "
                    f"{args.eval_seed}+; training seeds {','.join(map(str, seeds))}, {args.train_steps} training "
                    f"steps; tau {TAU:g}, local locking.")
        written = write_report(numbers, claims, outdir, command.strip(), settings, notes)
    stages = dict(sorted(timer.stages.items(), key=lambda kv: -kv[1]))
    total = timer.total()
    (outdir / "timings.json").write_text(json.dumps({"total_s": round(total, 1), "stages_s": {
        k: round(v, 1) for k, v in stages.items()}, "command": command.strip()}, indent=2) + "\n")
    if args.readme_snippet:
        written.append(write_readme_snippet(outdir, command.strip(), total))
    print("\n" + (outdir / "claims.md").read_text())
    print("stage times:")
    for name, seconds in stages.items():
        print(f"  {name:40s} {seconds:8.1f} s")
    print(f"total wall time: {total:.1f} s ({total / 60:.1f} min)")
    print("written: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
