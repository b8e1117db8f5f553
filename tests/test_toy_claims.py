"""scripts/toy_claims.py: the training command lines, the aggregation over seeds, the verdicts computed from fixed
numbers, the report (markdown, CSV, plots), and one tiny end-to-end stage (claim b: a 2-step training through
main.py, a 4-beta sweep of 1 image per prompt at 2 sampling steps, then the same command again resumed) plus the
two sampling paths evaluate.py does not have (a fine-tuned base model without a concept file; per-concept gates)."""
import csv
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from scripts import toy_claims as tc  # noqa: E402

SEEDS = (7, 8, 9)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread here and in main.py's subprocess: on 2 shared cores, two threads make the tiny runs slower."""
    import torch

    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp


# ----- pieces -------------------------------------------------------------------------------------------------------
def test_training_commands_follow_the_toy_configs_and_the_readme(tmp_path):
    commands = {key: tc.training_command(m, 8, 300, tmp_path / key) for key, m in tc.METHODS.items()}
    for key, command in commands.items():
        assert command[1].endswith("main.py") and command[command.index("--seed") + 1] == "8"
        assert command[command.index("--basedir") + 1] == str(tmp_path / key)
        assert command[-1] == "lightning.trainer.max_steps=300" and "-t" in command
        for config in tc.METHODS[key].configs:
            assert config in command and os.path.isfile(os.path.join(tc.REPO, config))
    base = commands["trained_keys"][commands["trained_keys"].index("--base") + 1:][:2]
    assert base == ["configs/toy/perfusion_star.yaml", "configs/toy/perfusion_star_trained_keys.yaml"]
    assert "data.params.train.params.use_masks=false" in commands["no_mask"]
    assert "data.params.train.params.use_masks=false" not in commands["perfusion"]
    assert commands["dots"][commands["dots"].index("--name") + 1] == "toy_dots"
    assert tc.run_dir(tmp_path, tc.METHODS["dots"], 9, 40) == tmp_path / "train" / "dots_seed9_steps40"
    # every claim's methods exist; (a) compares Perfusion with the three baselines
    assert set(tc.CLAIM_METHODS) == set(tc.ALL_CLAIMS)
    assert tc.CLAIM_METHODS["a"] == ("perfusion", "trained_keys", "textual_inversion", "dreambooth")
    assert tc.parse_claims("a, d") == "ad" and tc.parse_claims("edcba") == "abcde"
    with pytest.raises(SystemExit):
        tc.parse_claims("a,f")


def test_a_finished_dreambooth_export_is_found_only_at_the_requested_step(tmp_path):
    import torch
    from safetensors.torch import save_file

    method = tc.METHODS["dreambooth"]
    assert tc.trained_file(method, tmp_path, 300) is None
    folder = tmp_path / "2026-01-01T00-00-00_toy_star" / "checkpoints"
    folder.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(folder / "base-last.safetensors"), metadata={"global_step": "100"})
    assert tc.trained_file(method, tmp_path, 300) is None  # an interrupted run's intermediate export
    save_file({"x": torch.zeros(1)}, str(folder / "base-last.safetensors"), metadata={"global_step": "300"})
    assert tc.trained_file(method, tmp_path, 300) == folder / "base-last.safetensors"
    assert tc.trained_file(tc.METHODS["perfusion"], tmp_path, 300) is None
    (tmp_path / "toy_star.safetensors").write_bytes(b"")
    assert tc.trained_file(tc.METHODS["perfusion"], tmp_path, 300) == tmp_path / "toy_star.safetensors"


def test_verdict_trend_and_matching_rules_on_fixed_numbers():
    assert tc.verdict([True, True, True]) == "holds"
    assert tc.verdict([False, False]) == "does not hold"
    assert tc.verdict([True, False, True]) == "mixed"
    assert tc.verdict([]) == "not measured"
    assert tc.monotone([0.1, 0.2, 0.4]) == "rising" and tc.monotone([0.1, 0.1, 0.4]) == "rising (not strictly)"
    assert tc.monotone([0.5, 0.4, 0.1]) == "falling" and tc.monotone([0.3, 0.3]) == "flat"
    assert tc.monotone([0.1, 0.3, 0.2]) == "not monotone"
    assert tc.slope([0.5, 0.6, 0.7, 0.8], [0.8, 0.6, 0.4, 0.2]) == pytest.approx(-2.0)
    assert math.isnan(tc.slope([0.5], [0.1]))
    assert tc.harmonic(0.5, 0.5) == pytest.approx(0.5) and tc.harmonic(0.0, 0.0) == 0.0
    assert tc.harmonic(0.2, 0.8) == pytest.approx(2 * 0.2 * 0.8 / 1.0)
    mean, std = tc.mean_std([0.2, 0.4, float("nan")])
    assert mean == pytest.approx(0.3) and std == pytest.approx(0.1414213, abs=1e-6)
    assert math.isnan(tc.mean_std([0.2])[1])
    # alignment at matched fidelity: two parallel lines 0.1 apart over a shared fidelity range
    locked = [(0.1, 0.9), (0.3, 0.8), (0.5, 0.7)]
    trained = [(0.2, 0.75), (0.6, 0.55)]
    difference, how = tc.alignment_at_matched_fidelity(locked, trained)
    assert difference == pytest.approx(0.1) and "0.20-0.50" in how
    difference, how = tc.alignment_at_matched_fidelity([(0.1, 0.9)], [(0.6, 0.5), (0.8, 0.4)])
    assert difference == pytest.approx(0.4) and "do not meet" in how


def synthetic_numbers(b_fidelity, b_alignment) -> tc.Numbers:
    """Every claim's rows for three seeds: (b) from the given curves (beta 0.5..0.8) plus a per-seed wobble."""
    numbers = tc.Numbers()
    labels = {k: tc.METHODS[k].label for k in tc.METHODS}
    for k, seed in enumerate(SEEDS):
        wobble = 0.01 * k
        for key, f, a, kb in (("perfusion", 0.5, 0.7, 6.8), ("trained_keys", 0.7, 0.6, 11.0),
                              ("textual_inversion", 0.2, 0.7, 0.9), ("dreambooth", 0.7, 0.2, 21930.0)):
            numbers.put("a", labels[key], seed, samples=40, fidelity=f + wobble, alignment=a,
                        balance=tc.harmonic(f + wobble, a), file_KB=kb)
        for beta, f, a in zip(tc.BETAS, b_fidelity, b_alignment):
            numbers.put("b", f"beta {beta:g}", seed, samples=40, fidelity=f + wobble, alignment=a)
        numbers.put("c", "locked keys, beta 0.7", seed, samples=40, fidelity=0.5, alignment=0.7)
        numbers.put("c", "trained keys, beta 0.7", seed, samples=40, fidelity=0.5, alignment=0.6)
        numbers.put("c", "locked - trained keys at matched fidelity", seed,
                    alignment_difference=[0.1, 0.05, -0.02][k])
        numbers.put("d", "shared gate (beta 0.6, tau 0.15)", seed, samples=24, both_found=[0.5, 0.6, 0.25][k],
                    found_toy_star=0.7, found_toy_dots=0.7, alignment=0.5)
        numbers.put("d", "per-concept gates (balanced betas)", seed, samples=24, both_found=[0.7, 0.6, 0.5][k],
                    found_toy_star=0.8, found_toy_dots=0.8, alignment=0.5, beta_toy_star=0.5, beta_toy_dots=0.6)
        numbers.put("e", labels["perfusion"], seed, samples=40, fidelity=0.5, alignment=0.7)
        numbers.put("e", labels["no_mask"], seed, samples=40, fidelity=0.55, alignment=0.6)
    return numbers


def verdict_of(line: str) -> str:
    return line.split("**")[1].rsplit(": ", 1)[1]


def test_verdicts_are_computed_from_the_numbers():
    numbers = synthetic_numbers([0.8, 0.6, 0.4, 0.2], [0.3, 0.5, 0.7, 0.9])  # beta 0.5..0.8: a clean trade-off
    a = tc.verdicts(numbers, "a")
    assert [verdict_of(line) for line in a] == ["does not hold", "holds", "holds", "holds"]  # trained keys win
    assert "at most 100 KB" in a[-1] and "3,225x larger" in a[-1]
    b = tc.verdicts(numbers, "b")
    assert verdict_of(b[0]) == "holds" and "fidelity rises in 3/3 seeds, alignment falls in 3/3 seeds" in b[0]
    assert "beta 0.8, 0.7, 0.6, 0.5: fidelity rising (0.210, 0.410, 0.610, 0.810)" in b[1]  # listed from 0.8 down
    assert "alignment falling (0.900, 0.700, 0.500, 0.300)" in b[1]
    assert "in 3/3 seeds" in b[1]
    c = tc.verdicts(numbers, "c")
    assert verdict_of(c[0]) == "mixed" and "positive in 2/3 seeds" in c[0]
    d = tc.verdicts(numbers, "d")
    assert [verdict_of(line) for line in d] == ["mixed", "holds", "mixed"]  # 0.25 < 0.5 for seed 9; 0.6 = 0.6
    e = tc.verdicts(numbers, "e")
    assert verdict_of(e[0]) == "mixed" and "higher with masks in 3/3" in e[0] and "as high in 0/3" in e[0]

    # (b) not monotone and without any alignment trend: fidelity still rises overall, alignment does not fall
    bumpy = tc.verdicts(synthetic_numbers([0.8, 0.3, 0.5, 0.2], [0.5] * 4), "b")
    assert verdict_of(bumpy[0]) == "mixed" and "alignment falls in 0/3" in bumpy[0]
    assert "fidelity not monotone" in bumpy[1] and "alignment flat" in bumpy[1] and "in 0/3 seeds" in bumpy[1]
    # the opposite trade-off: the claim does not hold
    wrong = tc.verdicts(synthetic_numbers([0.2, 0.4, 0.6, 0.8], [0.9, 0.7, 0.5, 0.3]), "b")
    assert verdict_of(wrong[0]) == "does not hold"


def test_report_tables_csv_and_plots(tmp_path):
    numbers = synthetic_numbers([0.8, 0.6, 0.4, 0.2], [0.3, 0.5, 0.7, 0.9])
    written = tc.write_report(numbers, "abcde", tmp_path, "python scripts/toy_claims.py", "settings line.")
    snippet = tc.write_readme_snippet(tmp_path, "python scripts/toy_claims.py", 125.0)
    assert {p.name for p in written} == {"claims.md", "claims.csv", *(f"claim_{c}.png" for c in "abcde")}
    for claim in "abcde":
        image = Image.open(tmp_path / f"claim_{claim}.png")
        assert image.size == (800, 520) and len(set(image.convert("RGB").getdata())) > 5

    markdown = (tmp_path / "claims.md").read_text()
    for title in tc.CLAIM_TITLES.values():
        assert f"### {title}" in markdown
    # mean ± std over the three seeds (ddof 1), samples per seed x seeds
    assert "| Perfusion (locked keys) | 51.0 ± 1.0 % | 70.0 ± 0.0 % |" in markdown
    assert "| 6.8 | 40 x 3 |" in markdown and "| 21,930.0 | 40 x 3 |" in markdown
    assert markdown.count(": holds**") == 5  # a: 2 baselines + size, b: 1, d: 1 (as the verdict test finds)
    snippet_text = snippet.read_text()
    assert snippet_text.startswith("```\npython scripts/toy_claims.py\n```") and "2.1 min" in snippet_text
    assert "### (e) The mask loss on and off" in snippet_text

    with open(tmp_path / "claims.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    measured = [r for r in rows if r["row"] != "verdict"]
    keys = {(r["claim"], r["row"], r["quantity"]) for r in measured}
    assert len(keys) == len(measured)
    assert {("b", f"beta {b:g}", q) for b in tc.BETAS for q in ("fidelity", "alignment")} <= keys
    assert ("d", "per-concept gates (balanced betas)", "both_found") in keys
    fidelity = next(r for r in measured if r["claim"] == "a" and r["row"] == "Perfusion (locked keys)"
                    and r["quantity"] == "fidelity")
    assert float(fidelity["mean"]) == pytest.approx(0.51) and float(fidelity["std"]) == pytest.approx(0.01)
    assert fidelity["per_seed"] == "7:0.5;8:0.51;9:0.52" and fidelity["samples"] == "120"
    verdict_rows = [r for r in rows if r["row"] == "verdict"]
    assert [r["claim"] for r in verdict_rows] == list("aaaabbcddde")


# ----- one tiny end-to-end stage ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def claim_b_run(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("claims")
    argv = ["--outdir", str(outdir), "--claims", "b", "--seeds", "7", "--train_steps", "2", "--n", "1", "--steps",
            "2", "--readme-snippet"]
    assert tc.main(argv) == 0
    return outdir, argv


def test_claim_b_end_to_end_trains_through_main_samples_and_reports(claim_b_run, capsys):
    outdir, argv = claim_b_run
    concept = outdir / "train" / "perfusion_seed7_steps2" / "toy_star.safetensors"
    assert concept.is_file()
    sweep = outdir / "eval" / "perfusion_seed7_steps2"
    assert len(list(sweep.glob("beta*_tau0.15_local/*.png"))) == 4 * 5
    assert {p.name for p in outdir.iterdir()} >= {"claims.md", "claims.csv", "claim_b.png", "timings.json",
                                                  "readme_snippet.md"}
    with open(outdir / "claims.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    measured = [r for r in rows if r["row"] != "verdict"]
    assert {(r["row"], r["quantity"]) for r in measured} == {
        (f"beta {b:g}", q) for b in tc.BETAS for q in ("fidelity", "alignment")}
    assert all(r["claim"] == "b" and r["seeds"] == "1" and r["samples"] == "5" for r in measured)
    # the verdict agrees with the rule applied to the measured numbers
    value = {(r["row"], r["quantity"]): float(r["mean"]) for r in measured}
    betas = list(tc.BETAS)
    fidelity_rises = tc.slope(betas, [value[f"beta {b:g}", "fidelity"] for b in betas]) < 0
    alignment_falls = tc.slope(betas, [value[f"beta {b:g}", "alignment"] for b in betas]) > 0
    expected = tc.verdict([fidelity_rises, alignment_falls])
    verdict_rows = [r["quantity"] for r in rows if r["row"] == "verdict"]
    assert len(verdict_rows) == 2 and verdict_rows[0].endswith(f": {expected} (least-squares trend over beta: "
                                                               f"fidelity rises in {int(fidelity_rises)}/1 seeds, "
                                                               f"alignment falls in {int(alignment_falls)}/1 seeds)")
    timings = json.loads((outdir / "timings.json").read_text())
    assert {"train perfusion", "evaluate perfusion", "report"} <= set(timings["stages_s"])
    assert "--claims b" in (outdir / "readme_snippet.md").read_text()

    # the same command again: the training is skipped and every image reused
    capsys.readouterr()
    assert tc.main(argv) == 0
    out = capsys.readouterr().out
    assert f"reusing {concept}" in out and "generated 0 images, reused 20" in out and "total wall time" in out


def test_base_model_and_per_concept_gate_sampling(claim_b_run, tmp_path):
    """DreamBooth's path (no concept file: the prompt's words name the concept) on the shipped base model, and two
    concepts with one gate each (the trained toy_star and the shipped toy_dots), both recorded in the images."""
    outdir, _ = claim_b_run
    args = tc.get_parser().parse_args(["--n", "1", "--steps", "2"])
    row = tc.sample_and_read(args, tmp_path / "db", tc.PROMPTS, [], ["toy_star"], words="sks star", ckpt=tc.BASE_CKPT)
    assert row["images"] == 5 and row["judged"] == 4 and 0 <= row["fidelity"] <= 1
    first = Image.open(next((tmp_path / "db").glob("beta*/p000_*.png")))
    assert first.text["text"] == "a photo of a sks star" and first.text["concepts"] == ""

    star = outdir / "train" / "perfusion_seed7_steps2" / "toy_star.safetensors"
    pair = [star, tc.REPO / "ckpt" / "toy" / "toy_dots.safetensors"]
    gates = ([0.55, 0.75], [0.15, 0.2])
    row = tc.sample_and_read(args, tmp_path / "two", tc.TWO_CONCEPT_PROMPTS, pair, ["toy_star", "toy_dots"],
                             gates=gates)
    assert row["images"] == 3 and row["judged"] == 3
    assert row["all_found"] <= min(row["found_toy_star"], row["found_toy_dots"])
    image = Image.open(next((tmp_path / "two").glob("beta0.55_tau0.15_local/p001_*.png")))
    record = json.loads(image.text["evaluate"])
    assert record["per_concept_gates"] == [[0.55, 0.75], [0.15, 0.2]]
    assert image.text["text"].startswith("a photo of a * and a ") and "black background" in image.text["text"]
