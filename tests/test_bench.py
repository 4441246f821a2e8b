import json

import pytest
import torch
from typer.testing import CliRunner

from illava import IllavaConfig
from illava.tools.bench import METRICS, _PeakTensorMemory, make_inputs, run_bench, sweep_config
from illava.tools.cli import app


@pytest.fixture
def tiny_folder(tmp_path, model, config):
    from illava.tools.families import tools_for

    model.save_pretrained(tmp_path / "tiny")
    tools_for(config).image_processor(config).save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_bench_command_end_to_end_json_and_plot(tiny_folder, tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    args = [
        "bench",
        str(tiny_folder),
        "--repeats",
        "2",
        "--warmup",
        "0",
        "--new-tokens",
        "2",
        "--sweep",
        "0.5",
        "--json",
        str(out),
        "--plot",
        str(png),
    ]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "prefill / TTFT" in result.output and "of the predicted speedup" in result.output
    report = json.loads(out.read_text())
    assert set(report["settings"]) == {"stock", "disabled", "illava", "level 0.5"}
    for setting in report["settings"].values():
        assert set(setting["metrics"]) == set(METRICS)
        for metric in METRICS:
            m = setting["metrics"][metric]
            assert m["min"] <= m["median"] <= m["max"] and len(m["values"]) == (1 if metric == "peak_memory_mb" else 2)
        assert set(setting["gflops"]) == {"encoder", "projector", "llm", "lm_head", "total"}
        assert set(setting["visual_tokens"]) == {"stock", "after_encoder", "after_llm"}
    stock, ours = report["settings"]["stock"], report["settings"]["illava"]
    assert stock["visual_tokens"]["after_llm"] == stock["visual_tokens"]["stock"] == 664
    assert ours["visual_tokens"]["after_llm"] < ours["visual_tokens"]["after_encoder"] < 664
    assert ours["gflops"]["total"] < stock["gflops"]["total"]
    assert ours["flops_predicted_prefill_speedup"] == pytest.approx(stock["gflops"]["total"] / ours["gflops"]["total"])
    assert set(report["ratios"]) == {"disabled", "illava", "level 0.5"}
    assert report["config"]["encoder_layers"] == [1, 2, 3, 4]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_bad_arguments(tiny_folder):
    runner = CliRunner()
    assert runner.invoke(app, ["bench"]).exit_code == 2  # neither a model nor --arch
    assert runner.invoke(app, ["bench", str(tiny_folder), "--dtype", "int8"]).exit_code == 2
    result = runner.invoke(app, ["bench", str(tiny_folder), "--llm-layers", "9"])
    assert result.exit_code == 2 and "llm_layers" in result.output


def test_bench_on_qwen_video(tokenizer):
    from transformers import Qwen2VLForConditionalGeneration

    from illava.tools.architectures import tiny_config
    from illava.tools.bench import default_video

    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(tiny_config("tiny-qwen2-vl")).eval()
    inputs = make_inputs(model, None, [], [default_video(4)], batch_size=2)
    config = IllavaConfig(encoder_layers=(1,), encoder_removal=0.3, llm_layers=(2,), llm_keep_ratio=0.5)
    report = run_bench(model, "tiny-qwen2-vl", inputs, config, new_tokens=2, repeats=1, warmup=0)
    assert report["batch_size"] == 2
    ours = report["settings"]["illava"]
    assert ours["visual_tokens"]["after_llm"] < ours["visual_tokens"]["stock"]
    assert ours["gflops"]["encoder"] < report["settings"]["stock"]["gflops"]["encoder"]


def test_peak_tensor_memory_counts_live_storage():
    with _PeakTensorMemory() as tracker:
        a = torch.ones(256, 1024)  # 1 MiB
        b = a * 2  # 2 MiB live
        del b
        c = a + 1  # 2 MiB live again
        d = c.view(-1)  # a view allocates nothing
    assert tracker.peak == 2 * 2**20
    assert tracker.live == 2 * 2**20 and d.numel() == a.numel()


def test_sweep_config_scales_reduction():
    base = IllavaConfig(encoder_layers=(1, 2), encoder_removal=10, llm_layers=(2,), llm_keep_ratio=0.7)
    half = sweep_config(base, 0.5)
    assert half.encoder_removal == 5 and half.llm_keep_ratio == pytest.approx(0.85)
    frac = sweep_config(base.replace(encoder_removal=0.2), 2.0)
    assert frac.encoder_removal == pytest.approx(0.4) and frac.llm_keep_ratio == pytest.approx(0.4)
    assert sweep_config(base, 0.0).llm_keep_ratio == 1.0 and sweep_config(base, 0.0).encoder_removal == 0


def test_bench_of_methods_at_one_budget(tiny_folder, tmp_path):
    """`illava bench --method a,b --budget s`: every method's knob solved for the budget, prefill
    alternated with stock, ratios from adjacent pairs, the share of the FLOPs prediction."""
    out = tmp_path / "m.json"
    args = ["bench", str(tiny_folder), "--method", "fastv,divprune", "--budget", "0.8", "--repeats", "3"]
    result = CliRunner().invoke(app, [*args, "--warmup", "0", "--json", str(out)], env={"COLUMNS": "220"})
    assert result.exit_code == 0, result.output
    assert "share of predicted" in result.output and "adjacent-pair" in result.output
    report = json.loads(out.read_text())
    assert list(report["methods"]) == ["fastv", "divprune"] and report["budget"] == 0.8
    assert len(report["stock"]["prefill_s"]) == 3
    for row in report["methods"].values():
        assert len(row["prefill_s"]) == 3
        assert row["flops_share"] <= 0.8 or not row["budget_reached"]
        assert row["flops_predicted_prefill_speedup"] == pytest.approx(report["stock"]["gflops"] / row["gflops"])
        ratios = [s / m for s, m in zip(report["stock"]["prefill_s"], row["prefill_s"])]
        assert row["prefill_speedup"]["pair_median"] == pytest.approx(sorted(ratios)[1])
    assert report["methods"]["divprune"]["config"]["feature_keep"] is not None
    assert report["methods"]["fastv"]["config"]["policy"] == "fastv"


def test_bench_of_one_method_and_method_argument_errors(tiny_folder, tmp_path):
    out = tmp_path / "one.json"
    args = ["bench", str(tiny_folder), "--method", "tome", "--repeats", "1", "--warmup", "0", "--new-tokens", "1"]
    result = CliRunner().invoke(app, [*args, "--json", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["method"] == "tome" and report["config"]["policy"] == "tome"
    assert report["settings"]["illava"]["visual_tokens"]["after_encoder"] < 664
    runner = CliRunner()
    for bad, word in ((["--method", "fast-v"], "unknown method"), (["--budget", "0.5"], "--budget needs --method"),
                      (["--method", "fastv", "--budget", "2"], "--budget"),
                      (["--method", "fastv", "--sweep", "1"], "cannot be combined")):  # fmt: skip
        result = runner.invoke(app, ["bench", str(tiny_folder), *bad], env={"COLUMNS": "200"})
        assert result.exit_code == 2 and word in result.output, (bad, result.output)
