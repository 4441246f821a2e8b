"""lmms-eval integration: entry points, model arguments, and lmms-eval's own command line run
offline on an MME-style task with real photos."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval", reason="lmms-eval is installed by the README's test command")

from illava.tools.lmms import parse_config_args  # noqa: E402
from illava.tools.lmms_local import write_yes_no_task  # noqa: E402

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_config_arguments_parse_to_illava_config_fields():
    preset, overrides = parse_config_args(
        "image",
        {"encoder_layers": "5;6;7;8", "llm_layers": 8, "encoder_removal": "0.1;0.2;0.1;0.2", "recycle": "prune"},
    )
    assert preset == "image"
    assert overrides == {
        "encoder_layers": (5, 6, 7, 8),
        "llm_layers": (8,),
        "encoder_removal": (0.1, 0.2, 0.1, 0.2),
        "recycle": "prune",
    }
    assert parse_config_args("none", {}) == (None, {})
    with pytest.raises(ValueError, match="unknown model argument.*encoder_layer'.*encoder_layers"):
        parse_config_args("image", {"encoder_layer": 3})
    with pytest.raises(ValueError, match="preset=none"):
        parse_config_args("none", {"recycle": "prune"})


def test_models_registered_through_entry_points():
    from lmms_eval.models import MODEL_REGISTRY_V2

    from illava.adapters import ADAPTERS

    for name in ["illava", *(f"illava_{kind}" for adapter in ADAPTERS for kind in adapter.config_types)]:
        assert MODEL_REGISTRY_V2.get_manifest(name).simple_class_path == "illava.tools.lmms.IllavaLmms", name


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import LlavaOnevisionForConditionalGeneration, Qwen2VLForConditionalGeneration

    from illava.tools.architectures import tiny_config
    from illava.tools.families import tools_for
    from illava.tools.inputs import word_tokenizer

    root = tmp_path_factory.mktemp("lmms")
    tokenizer = word_tokenizer()
    cfg = tiny_config("tiny-llava-onevision")
    cfg.text_config.initializer_range = cfg.vision_config.initializer_range = 0.2
    torch.manual_seed(0)
    LlavaOnevisionForConditionalGeneration(cfg).save_pretrained(root / "llava")
    tools_for(cfg).image_processor(cfg).save_pretrained(root / "llava")
    tokenizer.save_pretrained(root / "llava")
    qcfg = tiny_config("tiny-qwen2-vl")
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(qcfg).save_pretrained(root / "qwen")
    tools_for(qcfg).image_processor(qcfg).save_pretrained(root / "qwen")
    tokenizer.save_pretrained(root / "qwen")
    return root, write_yes_no_task(root / "task")


def run_lmms(command, root, model, model_args, batch_size, name, limit=None):
    out = root / f"out-{name}"
    timing = root / f"timing-{name}.json"
    args = [
        *command,
        "--model",
        model,
        "--model_args",
        f"{model_args},device=cpu,timing_log={timing}",
        "--tasks",
        "illava_mme_local",
        "--include_path",
        str(root / "task"),
        "--batch_size",
        str(batch_size),
        "--output_path",
        str(out),
        "--log_samples",
        "--verbosity",
        "ERROR",
    ]
    if limit:
        args += ["--limit", str(limit)]
    proc = subprocess.run(args, env=OFFLINE, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results_file,) = out.rglob("*_results.json")
    results = json.loads(results_file.read_text())["results"]["illava_mme_local"]
    samples = [json.loads(line) for f in out.rglob("*samples*.jsonl") for line in f.read_text().splitlines()]
    responses = {s["doc_id"]: s["filtered_resps"] for s in samples}
    return results, responses, json.loads(timing.read_text())


LMMS_EVAL = [sys.executable, "-m", "lmms_eval"]


def test_lmms_eval_command_line_runs_illava_offline(folders):
    root, _ = folders
    llava = f"pretrained={root / 'llava'},preset=image"
    results, batched, timing = run_lmms(LMMS_EVAL, root, "illava_llava_onevision", llava, 4, "batched")
    assert 0.0 <= results["accuracy,none"] <= 1.0 and 0.0 <= results["accuracy_plus,none"] <= 1.0
    assert len(batched) == 16 and timing["samples"] == 16 and timing["batches"] == 4
    tokens = timing["visual_tokens"]
    assert tokens["after_llm"] < tokens["after_encoder"] < tokens["stock"]
    assert timing["prefill_seconds_total"] > 0 and timing["samples_per_s"] > 0
    # batch size 1: the same answers (left padding and batching do not change what a sample gets)
    _, single, _ = run_lmms(LMMS_EVAL, root, "illava_llava_onevision", llava, 1, "single")
    assert single == batched


def test_baseline_row_and_qwen_through_the_front_door(folders):
    root, _ = folders
    illava_cli = [str(Path(sys.executable).parent / "illava"), "eval", "lmms"]
    base, _, timing = run_lmms(
        illava_cli, root, "illava_llava_onevision", f"pretrained={root / 'llava'},preset=none", 2, "base", 4
    )
    assert timing["illava_config"] is None and "visual_tokens" not in timing
    args = f"pretrained={root / 'qwen'},preset=image,encoder_layers=1;3,encoder_removal=0.3"
    results, responses, timing = run_lmms(illava_cli, root, "illava_qwen2_vl", args, 2, "qwen", 4)
    assert len(responses) == 4 and 0.0 <= results["accuracy,none"] <= 1.0
    assert "encoder_layers=(1, 3)" in timing["illava_config"]
    assert timing["visual_tokens"]["after_encoder"] < timing["visual_tokens"]["stock"]


def test_unknown_model_argument_fails_clearly(folders):
    root, _ = folders
    proc = subprocess.run(
        [
            *LMMS_EVAL,
            "--model",
            "illava_llava_onevision",
            "--model_args",
            f"pretrained={root / 'llava'},encoder_layer=3,device=cpu",
            "--tasks",
            "illava_mme_local",
            "--include_path",
            str(root / "task"),
            "--limit",
            "1",
        ],
        env=OFFLINE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "unknown model argument" in proc.stdout + proc.stderr
