"""scripts/benchmark.py at tiny size: every section runs, prints its table and JSON line, and writes ratios."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "benchmark.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("perfusion_benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    pytest.importorskip("diffusers")
    out = tmp_path_factory.mktemp("benchmark") / "bench.json"
    command = [sys.executable, str(SCRIPT), "--tiny", "--steps", "1", "--warmup-steps", "1", "--tiny-repeats", "2",
               "--sample-steps", "2", "--tiny-threads", "1", "--json", str(out)]
    completed = subprocess.run(command, cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=300,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout, json.loads(out.read_text())


def test_every_section_prints_a_table_and_a_json_line_with_the_written_ratios(tiny_run):
    stdout, results = tiny_run
    json_lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert [line["section"] for line in json_lines] == ["train", "unet_overhead", "sample", "training_extras"]
    for line in json_lines:
        assert line["ratios"] == results["sections"][line["section"]]["ratios"]
    lines = stdout.splitlines()
    assert sum(line.startswith("### ") for line in lines) == 4
    assert sum(line.startswith("|---|") for line in lines) == 4  # one markdown table per section


def test_train_ratios_compare_perfusion_with_full_fine_tuning_and_the_frozen_unet_floor(tiny_run):
    _, results = tiny_run
    train = results["sections"]["train"]
    assert set(train["ratios"]) == {"checkpointing_off", "checkpointing_on"}
    for values in train["ratios"].values():
        for name in ("time", "cpu_time", "time_alone", "peak_memory", "step_memory", "perfusion_over_floor"):
            assert _positive(values[name]), (name, values)
    rows = {(row["mode"], row["checkpointing"]): row for row in train["rows"]}
    assert len(rows) == 6 and not any("error" in row for row in rows.values())
    assert "error" not in train["timing_run"] and all(row["timing"] == "interleaved" for row in rows.values())
    for checkpointing in (False, True):
        full, perf, floor = (rows[(mode, checkpointing)] for mode in ("full", "perfusion", "floor"))
        # tiny UNet: all 1.47M weights vs o*_V of its 3 cross-attentions (32 + 64 + 64... output widths)
        assert full["trainable_params"] > 1_000_000 and 0 < perf["trainable_params"] < 1_000
        assert perf["context_grad_norm"] > 0  # the word embedding's gradient was computed
        # AdamW state + gradients of every weight: full fine-tuning must need more memory than Perfusion
        assert full["peak_total_mb"] > perf["peak_total_mb"] > 0
        ratios = train["ratios"][f"checkpointing_{'on' if checkpointing else 'off'}"]
        assert ratios["peak_memory"] == pytest.approx(perf["peak_total_mb"] / full["peak_total_mb"])
        # the floor ran: no trainable weight, no optimizer, yet the gradient reached the context
        assert floor["trainable_params"] == 0 and floor["optimizer_s"] == 0 and floor["context_grad_norm"] > 0
        assert _positive(floor["step_s"]) and floor["peak_total_mb"] > 0
        assert ratios["perfusion_over_floor"] == pytest.approx(perf["step_s"] / floor["step_s"])


def test_unet_overhead_and_sample_ratios_are_measured_on_the_same_computation(tiny_run):
    _, results = tiny_run
    overhead = results["sections"]["unet_overhead"]["rows"][0]
    assert "error" not in overhead
    assert overhead["plain_s"] > 0 and overhead["personalized_s"] > 0
    assert results["sections"]["unet_overhead"]["ratios"]["tiny"]["overhead"] == pytest.approx(
        overhead["personalized_s"] / overhead["plain_s"] - 1)
    assert overhead["edit_changes_output"] > 1e-4     # the personalized forward really computed the edit
    assert overhead["every_call_matches"] <= 1e-5      # and rebuilding the edited weights every call changes nothing
    sample = results["sections"]["sample"]
    row = sample["rows"][0]
    assert "error" not in row
    assert _positive(sample["ratios"]["tiny"]["ours_over_diffusers"])
    assert _positive(sample["ratios"]["tiny"]["perfusion_over_diffusers"])
    # diffusers' pipeline built from our checkpoint produced our image: both timed the same work
    assert row["max_abs_image_diff_ours_vs_diffusers"] <= 1e-4
    assert row["max_abs_image_diff_perfusion_vs_ours"] > 1e-5


def test_bad_size_is_refused_naming_the_option(capsys):
    benchmark = _load_script()
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--tiny", "--tiny-size", "30"])
    assert exit_info.value.code == 2
    assert "--tiny-size 30" in capsys.readouterr().err


def test_training_extras_derive_the_cache_saving_and_logging_shares_from_their_timed_primitives(tiny_run):
    _, results = tiny_run
    row = results["sections"]["training_extras"]["rows"][0]
    assert "error" not in row
    encode, micro = row["encode_s"], row["train_micro_batch_s"]
    assert encode > 0 and micro > 0
    assert row["latent_cache_saving_per_micro_batch"] == pytest.approx(encode / (encode + micro))
    # 2 prompts x 2 betas, 20 guided steps (a UNet batch of 4) and a decode of 2 per beta
    assert row["validation_log_s"] == pytest.approx(2 * (20 * row["unet_forward_4_s"] + row["decode_2_s"]))
    training = 400 * 4 * micro
    assert row["validation_share"] == pytest.approx(4 * row["validation_log_s"] / (training + 4 * row["validation_log_s"]))
    assert row["old_image_logger_share"] > row["validation_share"]
