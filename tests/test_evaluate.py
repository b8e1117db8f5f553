"""scripts/evaluate.py: metrics on fixed embeddings and on toy-world images, a beta sweep on a tiny model (CSV, plot,
images, resume), --select-beta stored in the concept file and used by perfusion_txt2img.py."""
import contextlib
import csv
import io
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from ldm.util import instantiate_from_config  # noqa: E402
from perfusion.concept_file import load_concept, selected_gating  # noqa: E402
from scripts import evaluate as ev  # noqa: E402
from scripts import perfusion_txt2img as txt2img  # noqa: E402

INFERENCE_CONFIG = "configs/tiny/perfusion-inference-sd1-tiny.yaml"
BETAS = (0.55, 0.65)  # neither is a generic default, so a stored selection is recognisable


# ----- metrics ----------------------------------------------------------------------------------------------------
def test_metrics_equal_a_direct_computation_on_fixed_embeddings():
    rng = np.random.default_rng(0)
    generated, reference, texts = rng.normal(size=(3, 5)), rng.normal(size=(4, 5)), rng.normal(size=(3, 5))

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    pairs = [cos(g, r) for g in generated for r in reference]
    assert ev.mean_pairwise_cosine(generated, reference) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    paired = [cos(g, t) for g, t in zip(generated, texts)]
    assert ev.mean_paired_cosine(generated, texts) == pytest.approx(sum(paired) / 3, abs=1e-12)
    one_text = [cos(g, texts[0]) for g in generated]  # one prompt's text row against all of its images
    assert ev.mean_paired_cosine(generated, texts[:1]) == pytest.approx(sum(one_text) / 3, abs=1e-12)
    assert ev.mean_pairwise_cosine(generated[:1], generated[:1] * 3.0) == pytest.approx(1.0, abs=1e-12)

    # the --select-beta rule: min-max normalise each axis, harmonic mean, best wins (first of equals)
    fidelity, alignment = [0.9, 0.8, 0.6, 0.5], [0.20, 0.26, 0.30, 0.31]
    f = [(v - 0.5) / 0.4 for v in fidelity]
    a = [(v - 0.20) / 0.11 for v in alignment]
    expected = [2 * x * y / (x + y) if x + y else 0.0 for x, y in zip(f, a)]
    assert ev.harmonic_balance(fidelity, alignment) == pytest.approx(expected)
    rows = [{"fidelity": x, "alignment": y} for x, y in zip(fidelity, alignment)]
    assert ev.select_balanced(rows) == int(np.argmax(expected)) == 1
    assert ev.select_balanced([{"fidelity": 0.5, "alignment": 0.5}] * 3) == 0
    assert ev.pareto_front([(0.9, 0.2), (0.8, 0.26), (0.7, 0.25), (0.5, 0.31)]) == [3, 1, 0]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from tests._tiny_clip import write_tiny_clip

    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_clip_i_of_a_training_image_with_itself_is_one(tiny_clip, tiny_world):
    config, weights = tiny_clip
    clip = ev.ClipEmbedder(str(config), str(weights))
    images = ev.training_images(tiny_world.data_root)
    embeddings = clip.images(images)
    assert embeddings.shape == (len(images), 32)
    assert ev.mean_pairwise_cosine(embeddings[:1], clip.images(images[:1])) == pytest.approx(1.0, abs=1e-6)
    assert ev.mean_pairwise_cosine(embeddings[:1], embeddings[1:2]) < 1 - 1e-4


def test_dino_uses_the_cls_token_of_a_local_model_and_is_skipped_without_one(tiny_world, tmp_path):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(tmp_path / "dino")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "dino")
    dino, note = ev.load_dino(str(tmp_path / "dino"))
    assert note is None
    images = ev.training_images(tiny_world.data_root)[:2]
    embeddings = dino.images(images)
    with torch.no_grad():
        pixels = dino.processor(images=images, return_tensors="pt")["pixel_values"]
        cls = dino.model(pixel_values=pixels).last_hidden_state[:, 0]
    assert torch.allclose(embeddings, cls) and embeddings.shape == (2, 32)
    assert ev.mean_pairwise_cosine(embeddings[:1], dino.images(images[:1])) == pytest.approx(1.0, abs=1e-6)

    missing, note = ev.load_dino("facebook/dinov2-small")  # not in this machine's cache
    assert missing is None and note.startswith("note: DINO skipped") and "\n" not in note
    assert ev.load_dino("none") == (None, None)


def test_toy_metrics_equal_the_oracle_counts():
    from data.toy_oracle import check, concept_found, read_image
    from data.toy_world import ToyObject, ToyScene, concept_scene, one_object_scene, render

    rng = random.Random(3)
    scenes = [concept_scene("toy_star", rng, "white") for _ in range(3)]
    scenes += [concept_scene("toy_star", rng, "black"), one_object_scene(rng, "red", "circle", "white"),
               ToyScene("white", [ToyObject("star", "none", 9, 16, 6, pattern="toy_star"),
                                  ToyObject("circle", "red", 23, 16, 6)]),
               ToyScene("black", [ToyObject("star", "none", 9, 16, 6, pattern="toy_star"),
                                  ToyObject("circle", "blue", 23, 16, 6)])]
    images = [render(scene)[0] for scene in scenes]
    readings = [read_image(image) for image in images]
    found = [concept_found(r, "toy_star") for r in readings]
    assert 4 <= sum(found) < len(found)  # the set tests both outcomes

    white = ev.toy_prompt_scores(images, "a photo of a star on a white background", ["toy_star"])
    assert white["fidelity"] == pytest.approx(sum(found) / len(found))
    backgrounds = [check(r, "a photo of a star on a white background")["background"] for r in readings]
    assert white["alignment"] == pytest.approx(sum(backgrounds) / len(backgrounds))
    assert 0 < white["alignment"] < 1

    two = ev.toy_prompt_scores(images, "a photo of a star and a red circle on a white background", ["toy_star"])
    checks = [check(r, "a photo of a star and a red circle on a white background") for r in readings]
    followed = [c["background"] and c["count"] and c["both"] for c in checks]
    assert two["alignment"] == pytest.approx(sum(followed) / len(followed)) and sum(followed) >= 1

    plain = ev.toy_prompt_scores(images, "a photo of a star", ["toy_star", "toy_dots"])
    assert np.isnan(plain["alignment"])  # nothing asked for besides the concept
    both = [(concept_found(r, "toy_star") + concept_found(r, "toy_dots")) / 2 for r in readings]
    assert plain["fidelity"] == pytest.approx(sum(both) / len(both))


# ----- a sweep on a tiny model ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_concept(tiny_world, tmp_path_factory):
    """A concept of the tiny model after its first batch (targets initialised, no optimizer step)."""
    torch.manual_seed(3)
    config = tiny_world.perfusion_config(**{
        "model.params.personalization_config.params.initializer_words": ["teddy"]})
    model = instantiate_from_config(config.model)
    dataset = instantiate_from_config(OmegaConf.merge(config.data.params.train, {"params": {
        "data_root": str(tiny_world.data_root), "placeholder_token": "*", "superclass": "teddy",
        "templates": ["a photo of a {}"]}}))
    with torch.no_grad():
        model.shared_step(default_collate([dataset[i] for i in range(2)]))
    return model.save_concept_file(tmp_path_factory.mktemp("concept") / "teddy.safetensors")


def sweep_args(concept, tiny_world, tiny_clip, outdir, prompts, *extra):
    config, weights = tiny_clip
    return ["--personalized_ckpt", str(concept), "--config", INFERENCE_CONFIG, "--ckpt", str(tiny_world.ckpt),
            "--train_images", str(tiny_world.data_root), "--prompts", str(prompts), "--n", "2", "--steps", "2",
            "--scale", "3.0", "--beta", ",".join(map(str, BETAS)), "--tau", "0.15", "--outdir", str(outdir),
            "--clip_model", str(config), "--clip_pretrained", str(weights), "--H", "32", "--W", "32", "--f", "4",
            *extra]


def read_rows(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def sweep(tiny_concept, tiny_world, tiny_clip, tmp_path_factory):
    """Two runs of the same sweep: the first generates, the second reuses and selects beta (in a copy of the
    concept file; ``tiny_concept`` stays as training wrote it)."""
    import shutil

    root = tmp_path_factory.mktemp("sweep")
    concept = shutil.copyfile(tiny_concept, root / "teddy.safetensors")
    prompts = root / "prompts.txt"
    prompts.write_text("# two prompts\na photo of a {}\na {} on the beach\n")
    outdir = root / "out"
    outputs = []
    for extra in ([], ["--select-beta", "--dino_model", "none"]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = ev.main(sweep_args(concept, tiny_world, tiny_clip, outdir, prompts, *extra))
        assert code == 0, err.getvalue()[-3000:]
        outputs.append((out.getvalue(), err.getvalue(), read_rows(outdir / "results.csv"),
                        {p: p.stat().st_mtime_ns for p in outdir.glob("*/p*.png")}))
    return {"outdir": outdir, "runs": outputs, "concept": concept, "prompts": prompts}


def test_sweep_writes_csv_plot_and_images_and_a_second_run_reuses_them(sweep, tiny_clip, tiny_world):
    (out1, _, rows1, images1), (out2, _, rows2, images2) = sweep["runs"]
    outdir = sweep["outdir"]
    assert "note: DINO skipped" in out1 and "hf download facebook/dinov2-small" in out1
    assert "generated 8 images, reused 0" in out1
    assert "generated 0 images, reused 8" in out2
    assert len(images1) == 8 and images1 == images2  # same files, not rewritten
    assert [(float(r["beta"]), r["global_locking"]) for r in rows1] == [(b, "False") for b in BETAS]
    for row in rows1:
        for key in ("clip_i", "clip_i_std", "clip_t", "clip_t_std", "fidelity", "alignment", "balance"):
            assert np.isfinite(float(row[key])), key
        assert row["n"] == "2" and row["prompts"] == "2"
        assert -1 <= float(row["clip_i"]) <= 1 and float(row["fidelity"]) == float(row["clip_i"])
    assert rows1 == rows2  # the same images give the same scores
    assert Image.open(outdir / "pareto.png").size == (720, 520) and (outdir / "sheet.png").is_file()

    # CLIP-I and CLIP-T of the first setting, recomputed from its images on disk
    config, weights = tiny_clip
    clip = ev.ClipEmbedder(str(config), str(weights))
    train = clip.images(ev.training_images(tiny_world.data_root))
    folder = outdir / ev.setting_name(BETAS[0], 0.15, False)
    per_prompt_i, per_prompt_t = [], []
    for i, superclass_prompt in enumerate(["a photo of a teddy", "a teddy on the beach"]):
        files = sorted(folder.glob(f"p{i:03d}_seed{42 + i}_*.png"))
        assert len(files) == 2 and Image.open(files[0]).text["beta"] == f"{BETAS[0]:g}"
        embeddings = clip.images([Image.open(f) for f in files])
        per_prompt_i.append(ev.mean_pairwise_cosine(embeddings, train))
        per_prompt_t.append(ev.mean_paired_cosine(embeddings, clip.texts([superclass_prompt])))
    assert float(rows1[0]["clip_i"]) == pytest.approx(np.mean(per_prompt_i), abs=1e-5)
    assert float(rows1[0]["clip_i_std"]) == pytest.approx(np.std(per_prompt_i), abs=1e-5)
    assert float(rows1[0]["clip_t"]) == pytest.approx(np.mean(per_prompt_t), abs=1e-5)


def test_toy_metric_scores_the_same_sweep(sweep, tiny_world, tiny_clip):
    outdir = sweep["outdir"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = ev.main(sweep_args(sweep["concept"], tiny_world, tiny_clip, outdir, sweep["prompts"], "--metric", "toy",
                                  "--toy_concept", "toy_star", "--select-beta"))
    assert code == 0
    assert "generated 0 images, reused 8" in out.getvalue()
    # the tiny model draws no toy star and the prompts ask for nothing else: all settings tie, nothing is stored
    assert "nothing to select" in out.getvalue()
    rows = read_rows(outdir / "results.csv")
    assert len(rows) == 2 and {"fidelity", "fidelity_std", "alignment", "balance"} <= set(rows[0])
    assert "clip_i" not in rows[0]


def test_select_beta_is_used_by_txt2img_and_a_flag_still_wins(sweep, tiny_world, tmp_path):
    concept = sweep["concept"]
    (_, _, rows, _), (out2, _, _, _) = sweep["runs"]
    best = max(range(len(rows)), key=lambda i: (float(rows[i]["balance"]), -i))
    stored = load_concept(concept)
    assert stored.metadata["beta"] == float(rows[best]["beta"]) in BETAS and stored.metadata["tau"] == 0.15
    record = stored.metadata["selected_by"]
    assert record["global_locking"] is False and "harmonic mean" in record["rule"]
    assert [s[0] for s in record["settings"]] == list(BETAS)
    assert selected_gating(stored) == (stored.metadata["beta"], 0.15) and selected_gating(stored, True) is None
    assert f"defaults to beta {stored.metadata['beta']:g}" in out2

    base = ["--steps", "2", "--scale", "3.0", "--n_samples", "2", "--n_iter", "1", "--personalized_ckpt",
            str(concept), "--prompt", "a photo of a {}", "--config", INFERENCE_CONFIG, "--ckpt", str(tiny_world.ckpt),
            "--H", "32", "--W", "32", "--f", "4", "--seed", "42", "--skip_grid"]
    assert txt2img.main([*base, "--outdir", str(tmp_path / "default")]) == 0
    files = sorted((tmp_path / "default" / "samples").glob("*.png"))
    meta = Image.open(files[0]).text
    assert meta["beta"] == f"{stored.metadata['beta']:g}" and meta["tau"] == "0.15"
    assert meta["beta_source"] == "concept file" and meta["tau_source"] == "concept file"
    # the same code path: txt2img's images are the sweep's images of that setting (prompt 0, seed 42)
    folder = sweep["outdir"] / ev.setting_name(stored.metadata["beta"], 0.15, False)
    for j, path in enumerate(files):
        ours = np.asarray(Image.open(folder / f"p000_seed42_{j:03d}.png")).astype(int)
        assert np.abs(np.asarray(Image.open(path)).astype(int) - ours).max() <= 1

    assert txt2img.main([*base, "--beta", "0.7", "--outdir", str(tmp_path / "flag")]) == 0
    meta = Image.open(sorted((tmp_path / "flag" / "samples").glob("*.png"))[0]).text
    assert meta["beta"] == "0.7" and meta["beta_source"] == "flag"
    assert meta["tau"] == "0.15" and meta["tau_source"] == "concept file"


def test_concepts_without_a_selection_keep_the_generic_defaults(sweep, tiny_concept):
    fresh, selected = load_concept(tiny_concept), load_concept(sweep["concept"])  # as trained / after --select-beta
    assert fresh.metadata["beta"] == 0.7 and "selected_by" not in fresh.metadata
    assert txt2img.resolve_gating(None, None, [fresh]) == ([0.7], [0.15], ["default"], ["default"])
    assert txt2img.resolve_gating(None, None, [fresh, fresh]) == ([0.6, 0.6], [0.15, 0.15], ["default"] * 2,
                                                                  ["default"] * 2)
    beta = selected.metadata["beta"]
    assert txt2img.resolve_gating(None, None, [selected, fresh]) == (
        [beta, 0.6], [0.15, 0.15], ["concept file", "default"], ["concept file", "default"])
    with pytest.warns(UserWarning, match="selected without global locking"):
        assert txt2img.resolve_gating(None, None, [selected], global_locking=True)[0] == [0.7]
    assert txt2img.resolve_gating("0.4", None, [selected])[:3] == ([0.4], [0.15], ["flag"])
    # --select-beta rewrote the metadata only: the tensors are those of the concept as trained
    assert torch.equal(fresh.embedding, selected.embedding) and torch.equal(fresh.target_input, selected.target_input)
    assert all(torch.equal(fresh.value_outputs[k], selected.value_outputs[k]) for k in fresh.value_outputs)
    assert {k: v for k, v in selected.metadata.items() if k not in ("beta", "tau", "selected_by")} == \
        {k: v for k, v in fresh.metadata.items() if k not in ("beta", "tau")}


def test_missing_clip_weights_offline_is_one_line_with_the_fix(tiny_concept, tiny_world, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a {}\n")
    args = ["--personalized_ckpt", str(tiny_concept), "--config", INFERENCE_CONFIG, "--ckpt", str(tiny_world.ckpt),
            "--train_images", str(tiny_world.data_root), "--prompts", str(prompts), "--outdir", str(tmp_path / "o"),
            "--clip_model", "ViT-B-32", "--clip_pretrained", "openai"]
    assert ev.main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "hf download" in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "o").exists()
