"""`make demo`: Perfusion teaches the shipped toy base model a new concept, on the CPU, in a few minutes.

1. the toy concept ``toy_star`` (an orange star, a colour the toy world never shows; super-class ``star``):
   training images and soft masks under training_data/toy_star/ (data/toy_world.py);
2. training with main.py on the toy base model ckpt/toy/base.safetensors (the seed's command line);
3. generation with scripts/perfusion_txt2img.py (the seed's command line) for a few prompts, with the super-class
   word on the base model and with the concept; the last row combines it with the shipped concept ``toy_dots``
   (a blue square with four yellow dots; ckpt/toy/toy_dots.safetensors);
4. one labelled sheet (rows: prompts; columns: base model, Perfusion) and the toy oracle's scores.

Everything goes under outputs/demo/ (``--outdir``); TensorBoard: ``tensorboard --logdir outputs/demo/logs``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOY = REPO / "ckpt" / "toy"
CONFIG = REPO / "configs" / "toy" / "inference.yaml"
SUGGESTED_SEED = 1  # found toy_star in 75 % of samples on 1 CPU thread (ckpt/toy/README.md, "Masks that spill")

# (label, prompt with {} (or {1}/{2}) for the concepts, what the oracle should find besides the concept)
ROWS = [
    ("plain", "a photo of a {}", None),
    ("white background", "a photo of a {} on a white background", "a star on a white background"),
    ("black background", "a photo of a {} on a black background", "a star on a black background"),
    ("next to a red circle", "a photo of a {} and a red circle on a white background",
     "a star and a red circle on a white background"),
    ("two concepts", "a photo of a {1} and a {2} on a black background", "a star and a square on a black background"),
]


def run(args: list[str]) -> None:
    print("\n$ " + " ".join(str(a) for a in args), flush=True)
    subprocess.run([sys.executable, *map(str, args)], cwd=REPO, check=True)


def generate(prompt: str, outdir: Path, n: int, steps: int, seed: int, concepts: list[Path]) -> list[Path]:
    """The seed's command line, run in this process (its main(), the same code as the script): ten model loads
    are cheap, ten Python start-ups importing torch are not."""
    from scripts.perfusion_txt2img import main as txt2img

    # perfusion_txt2img.py numbers new files after those already there: start each cell empty, so that a second
    # run of the demo does not mix its samples with the first run's
    shutil.rmtree(outdir, ignore_errors=True)
    args = ["--config", CONFIG, "--ckpt", TOY / "base.safetensors",
            "--prompt", prompt, "--n_samples", n, "--n_iter", 1, "--steps", steps, "--scale", 4.0, "--seed", seed,
            "--outdir", outdir]
    if concepts:
        args += ["--personalized_ckpt", ",".join(map(str, concepts))]
    shown = shlex.join(str(a) for a in args).replace(f"{REPO}{os.sep}", "")
    print(f"\n$ python scripts/perfusion_txt2img.py {shown}", flush=True)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        code = txt2img([str(a) for a in args])
    if code:
        raise SystemExit(f"perfusion_txt2img.py failed with status {code}")
    return sorted((outdir / "samples").glob("*.png"))


def fill(prompt: str, words: list[str]) -> str:
    for i, word in enumerate(words, start=1):
        prompt = prompt.replace(f"{{{i}}}", word)
    return prompt.replace("{}", words[0])


def score_row(paths: list[Path], concepts: list[str], context: str | None) -> dict[str, float]:
    """Share of samples with each concept's pattern, and of samples following the rest of the prompt."""
    from data.toy_oracle import check, concept_found, read_image

    readings = [read_image(p) for p in paths]
    scores = {f"found {name}": sum(concept_found(r, name) for r in readings) / len(readings) for name in concepts}
    if context is not None:
        checks = [check(r, context) for r in readings]
        if "background" in checks[0]:
            scores["background"] = sum(c["background"] for c in checks) / len(checks)
        if "count" in checks[0]:
            scores["two objects"] = sum(c["count"] for c in checks) / len(checks)
    return scores


def make_sheet(rows: list[dict], columns: list[str], show: int, factor: int = 3):
    """Rows of prompts; per column ``show`` upscaled samples and the oracle's scores under them."""
    from PIL import Image, ImageDraw

    tile, pad, label_w, head = 32 * factor, 4, 340, 28
    col_w = show * (tile + 2) + pad * 2
    row_h = tile + 30
    sheet = Image.new("RGB", (label_w + len(columns) * col_w, head + len(rows) * row_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, column in enumerate(columns):
        draw.text((label_w + j * col_w + pad, 8), column, fill=(0, 0, 0))
    for i, row in enumerate(rows):
        y = head + i * row_h
        draw.text((6, y + 4), row["label"], fill=(0, 0, 0))
        for k, line in enumerate(row["prompts"]):
            draw.text((6, y + 22 + 14 * k), line, fill=(80, 80, 80))
        for j, column in enumerate(columns):
            x = label_w + j * col_w + pad
            for k, path in enumerate(row["images"][column][:show]):
                image = Image.open(path).convert("RGB").resize((tile, tile), Image.Resampling.NEAREST)
                sheet.paste(image, (x + k * (tile + 2), y))
            text = ", ".join(f"{key} {100 * v:.0f}%" for key, v in row["scores"][column].items())
            draw.text((x, y + tile + 4), text, fill=(0, 90, 0))
    return sheet


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outdir", default="outputs/demo")
    parser.add_argument("--train_steps", type=int, default=200, help="optimizer steps of concept training")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps per sample")
    parser.add_argument("--n_samples", type=int, default=16, help="samples per prompt and column")
    parser.add_argument("--show", type=int, default=6, help="samples per cell of the sheet")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--sheet_copy", default=None, help="also copy the sheet here (e.g. docs/toy_demo.png)")
    args = parser.parse_args(argv)

    from data.toy_world import write_concept

    for needed in ("base.safetensors", "C_inv.npy", "toy_dots.safetensors"):
        if not (TOY / needed).is_file():
            raise SystemExit(f"{TOY / needed} is missing: the toy base model ships with the repository "
                             "(git checkout ckpt/toy), see ckpt/toy/README.md for how it was made")
    out = (REPO / args.outdir).resolve()
    data = REPO / "training_data" / "toy_star"
    if not (data / "mask").is_dir():
        write_concept("toy_star", data)

    run(["main.py", "--name", "toy_star", "--base", "configs/toy/perfusion_star.yaml", "--basedir", out / "logs",
         "-t", "True", "--seed", args.seed, f"data.params.train.params.data_root={data}",
         f"lightning.trainer.max_steps={args.train_steps}"])
    star = out / "logs" / "toy_star.safetensors"
    dots = TOY / "toy_dots.safetensors"

    columns = ["base model (super-class word)", "Perfusion (toy_star)"]
    rows = []
    for label, prompt, context in ROWS:
        two = "{1}" in prompt
        concepts = [star, dots] if two else [star]
        names = ["toy_star", "toy_dots"] if two else ["toy_star"]
        base_prompt = fill(prompt, ["star", "square"])
        slug = label.replace(" ", "_")
        base = generate(base_prompt, out / "samples" / f"{slug}-base", args.n_samples, args.steps, args.seed, [])
        tuned = generate(prompt, out / "samples" / f"{slug}-perfusion", args.n_samples, args.steps, args.seed,
                         concepts)
        rows.append({"label": label, "prompts": [base_prompt, prompt],
                     "images": {columns[0]: base, columns[1]: tuned},
                     "scores": {columns[0]: score_row(base, names, context),
                                columns[1]: score_row(tuned, names, context)}})

    sheet_path = out / "demo_sheet.png"
    make_sheet(rows, columns, args.show).save(sheet_path)
    if args.sheet_copy:
        (REPO / args.sheet_copy).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sheet_path, REPO / args.sheet_copy)
    report = {row["label"]: {"prompt": row["prompts"][1], **row["scores"][columns[1]],
                             "base": row["scores"][columns[0]]} for row in rows}
    (out / "scores.json").write_text(json.dumps(report, indent=2) + "\n")

    print("\nToy oracle on the samples (Perfusion column; base model in brackets):")
    for row in rows:
        tuned, base = row["scores"][columns[1]], row["scores"][columns[0]]
        parts = [f"{k} {100 * v:.0f}% [{100 * base.get(k, 0):.0f}%]" for k, v in tuned.items()]
        print(f"  {row['prompts'][1]:45s} " + ", ".join(parts))
    plain = rows[0]["scores"][columns[1]]["found toy_star"]
    if plain < 0.5:
        print(f"\ntoy_star was found in only {100 * plain:.0f} % of '{rows[0]['prompts'][1]}' samples: this training is one of "
              "the failures. In the toy world a training learns the concept or loses it depending on rounding and random "
              "numbers (8 of 8 training seeds found it in 75-100 % of samples on this project's CPU, but other trainings "
              "can lose it in their last steps; ckpt/toy/README.md explains why). "
              f"Another training seed often learns it:\n    make demo DEMO_ARGS='--seed {SUGGESTED_SEED}'")
    print(f"\nSheet: {sheet_path}\nConcept: {star} ({star.stat().st_size} bytes)\nScores: {out / 'scores.json'}\n"
          f"TensorBoard: tensorboard --logdir {out / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
