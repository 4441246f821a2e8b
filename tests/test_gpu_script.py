"""benchmarks/gpu.sh --dry-run: the GPU script end to end on CPU with tiny configurations (seconds),
its JSON, and the results table (docs/results.md) made from it; and the helpers of benchmarks/gpu.py."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["image", "video", "throughput", "qwen2.5-vl image", "internvl image", "merge layer cost"]
ARCHITECTURES = {1: "tiny-llava-onevision", 2: "tiny-llava-onevision", 4: "tiny-qwen2.5-vl", 5: "tiny-internvl"}


def gpu_module():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def check_bench_row(row: dict) -> None:
    assert row["architecture"] == ARCHITECTURES[row["row"]]
    report = row["report"]
    assert set(report["settings"]) == {"stock", "disabled", "illava"}
    for setting in ("disabled", "illava"):
        for metric in ("encoder_s", "prefill_s", "decode_tokens_per_s", "samples_per_s", "peak_memory_mb"):
            gain = row["gains"][setting][metric]
            assert set(gain) == {"median_ratio", "pair_median", "min_ratio"}
            assert all(value > 0 for value in gain.values()), (setting, metric, gain)
    stock, reduced = row["visual_tokens"]["stock"], row["visual_tokens"]["illava"]
    assert stock["after_llm"] == stock["stock"] == reduced["stock"] > 0
    assert reduced["after_encoder"] < reduced["stock"]
    assert report["settings"]["illava"]["flops_predicted_prefill_speedup"] > 1


def test_dry_run_writes_six_rows_and_readme_table(tmp_path):
    start = time.perf_counter()
    env = {**os.environ, "PYTHON": sys.executable}
    command = ["bash", "benchmarks/gpu.sh", "--dry-run", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = json.loads((tmp_path / "gpu.json").read_text())
    assert [(r["row"], r["name"]) for r in rows] == list(enumerate(NAMES, 1))
    for row in rows:
        assert row["status"] == "ok", (row["name"], row["reason"], row.get("traceback"))
        assert row["device"] == "cpu" and row["dtype"] == "float32" and row["dry_run"] is True
        assert row["torch"] == torch.__version__ and row["transformers"] == transformers.__version__
        assert 0 < row["timing"]["row_s"] < time.perf_counter() - start
    for row in (rows[0], rows[1], rows[3], rows[4]):
        check_bench_row(row)
    image, video = rows[0]["visual_tokens"]["illava"], rows[1]["visual_tokens"]["illava"]
    assert image["after_llm"] < image["after_encoder"]  # tiny LLaVA-OneVision: both stages act
    assert video["after_llm"] < video["after_encoder"] < video["stock"]
    assert rows[1]["report"]["config"]["preset"] == "video"

    throughput = rows[2]
    assert throughput["memory_cap_mb"] > 0
    for setting in ("stock", "illava"):
        found = throughput["settings"][setting]
        assert 1 <= found["batch"] <= throughput["max_batch"]
        fitting = [p for p in found["probes"] if p["fits"]]
        assert max(p["batch"] for p in fitting) == found["batch"]
        assert all(p["peak_memory_mb"] <= throughput["memory_cap_mb"] for p in fitting)
        assert found["samples_per_s"]["median"] > 0
    assert throughput["gain"]["pair_median"] > 0

    merge = rows[5]
    assert [layer["architecture"] for layer in merge["layers"]] == ["tiny-llava-onevision", "tiny-internvl"]
    for layer in merge["layers"]:
        assert "error" not in layer, layer
        assert layer["crops"] >= 1 and layer["tokens_per_crop"] > layer["removal"] > 0
        assert layer["layer_cost_ratio"]["pair_median"] > 0 and layer["attention_cost_ratio"]["pair_median"] > 0
    assert merge["ratio"] == merge["layers"][0]["layer_cost_ratio"]["pair_median"] > 0

    command = [sys.executable, "benchmarks/readme_table.py", "--from-json", str(tmp_path / "gpu.json")]
    table = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr[-4000:]
    lines = table.stdout.splitlines()
    assert lines[0].startswith("| architecture | GPU | dtype | preset |") and lines[1].startswith("|---|")
    body = [line for line in lines[2:] if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in body] == ["| " + ARCHITECTURES[n] for n in (1, 2, 4, 5)]
    assert all(line.count("|") == 14 for line in body)
    assert "(batch " in body[0] and body[1].endswith("| - |")  # throughput gain on the image row only
    assert any(line.startswith("- throughput at equal memory") for line in lines)
    assert sum(line.startswith("- encoder merge layer") for line in lines) == 2


def test_batch_search_gains_and_budget(tmp_path):
    gpu = gpu_module()
    probed = []

    def fits(batch: int) -> bool:
        probed.append(batch)
        return batch <= 37

    assert gpu.largest_batch(fits, 256, time.perf_counter() + 60) >= 37 * 7 // 8
    assert probed[:7] == [1, 2, 4, 8, 16, 32, 64]
    assert gpu.largest_batch(lambda b: True, 8, time.perf_counter() + 60) == 8
    assert gpu.largest_batch(lambda b: False, 8, time.perf_counter() + 60) == 0

    # times of alternated runs: pair ratios 2, 1, 4 -> median 2; best runs 1.0 vs 1.0 -> 1
    gain = gpu.gain_estimates("prefill_s", [2.0, 1.0, 4.0], [1.0, 1.0, 1.0])
    assert gain == {"median_ratio": 2.0, "pair_median": 2.0, "min_ratio": 1.0}
    rate = gpu.gain_estimates("samples_per_s", [1.0, 2.0], [3.0, 2.0])
    assert rate["pair_median"] == 2.0 and rate["min_ratio"] == 1.5

    plan = gpu.Plan.from_args(argparse.Namespace(dry_run=True, memory_cap_gb=None))
    runner = gpu.Runner(plan, tmp_path / "gpu.json", budget_s=1.0, rows=None)
    runner.row(1, "image", lambda: {"never": "run"})
    written = json.loads((tmp_path / "gpu.json").read_text())
    assert written[0]["status"] == "skipped" and written[0]["reason"].startswith("budget")
    assert "never" not in written[0]
