"""`make demo`: the whole Perfusion workflow on a tiny world of our own, on the CPU, in about a minute.

1. a tiny SD1-structured base model (random weights: the pretrained toy base model comes in a later issue),
2. the C^-1 of its text encoder estimated over toy captions (data/estimate_C_inv.py's code),
3. a toy 'teddy' concept: images plus soft masks,
4. training with main.py (the seed's command line, tiny configs),
5. generation with scripts/perfusion_txt2img.py (the seed's command line),
all under outputs/demo/. Because the base model is untrained, the pictures show structure, not teddies.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(args: list[str]) -> None:
    print("\n$ " + " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=REPO, check=True)


def main() -> int:
    from ldm.testing import write_tiny_checkpoint
    from perfusion.toy_world import write_toy_c_inv, write_toy_concept_images

    out = REPO / "outputs" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    print("NOTE: the shipped, pretrained toy base model is not there yet (a later issue); this demo runs the full "
          "workflow on a tiny base model with random weights.")
    base = write_tiny_checkpoint(out / "tiny-sd1.safetensors", "sd1", seed=0)
    write_toy_c_inv(base.cond_stage_model, out / "C_inv_tiny.npy")
    write_toy_concept_images(out / "teddy", n=6, size=32, seed=0)
    print(f"tiny world written to {out}")
    run(["main.py", "--name", "teddy", "--base", "configs/tiny/sd1-tiny.yaml", "configs/tiny/perfusion-tiny.yaml",
         "--basedir", str(out / "logs"), "-t", "True",
         f"model.params.ckpt_path={out / 'tiny-sd1.safetensors'}", f"model.params.C_inv_path={out / 'C_inv_tiny.npy'}",
         f"data.params.train.params.data_root={out / 'teddy'}", "lightning.trainer.max_steps=20",
         "lightning.modelcheckpoint_step.params.every_n_train_steps=10",
         "lightning.callbacks.image_logger.params.batch_frequency=10"])
    run(["scripts/perfusion_txt2img.py", "--ddim_eta", "0.0", "--steps", "20", "--scale", "6.0", "--beta", "0.7",
         "--tau", "0.15", "--n_samples", "4", "--n_iter", "1", "--personalized_ckpt",
         str(out / "logs" / "teddy.safetensors"), "--prompt", "photo of a {}",
         "--config", "configs/tiny/perfusion-inference-sd1-tiny.yaml", "--ckpt", str(out / "tiny-sd1.safetensors"),
         "--H", "32", "--W", "32", "--f", "4", "--outdir", str(out / "samples")])
    concept = out / "logs" / "teddy.safetensors"
    print(f"\nDemo done. Concept file: {concept} ({concept.stat().st_size} bytes); samples and grid: "
          f"{out / 'samples'}; TensorBoard: tensorboard --logdir {out / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
