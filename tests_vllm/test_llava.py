"""LLaVA-1.5 through vLLM with the plugin: off is stock vLLM token for token; on, the placeholder
counts and greedy tokens are the transformers backend's (same folder, images, configuration)."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
from conftest import chat, check_against_reference, reference, run_vllm

IMAGE_ID = 1  # the tiny configuration's <image>
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def batch(images):
    """A batch of mixed requests: images of different sizes, a text-only request, two images in one prompt."""
    return [
        {"prompt": chat("what is this?"), "images": [images["a"]]},
        {"prompt": chat("hello there, how are you?", count=0), "images": []},
        {"prompt": chat("and this one?"), "images": [images["b"]]},
        {"prompt": chat("compare them", count=2), "images": [images["c"], images["d"]]},
    ]


def test_the_entry_point_registers_the_plugin():
    (plugin,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "illava"]
    assert plugin.value == "illava.vllm:register"
    from vllm import ModelRegistry

    plugin.load()()
    model = ModelRegistry.models["LlavaForConditionalGeneration"]
    assert (model.module_name, model.class_name) == ("illava.vllm.llava", "IllavaLlavaForConditionalGeneration")


def test_off_is_stock_vllm_token_for_token(llava, batch):
    stock = run_vllm(llava, batch, MAX_TOKENS, stock=True)
    plugin = run_vllm(llava, batch, MAX_TOKENS)  # the plugin loaded, no illava configuration
    assert "results" in stock, stock.get("stderr", "")[-4000:]
    assert "results" in plugin, plugin.get("stderr", "")[-4000:]
    assert plugin["results"] == stock["results"]
    counts = [r["prompt_token_ids"].count(IMAGE_ID) for r in stock["results"]]
    assert counts == [64, 0, 64, 128]  # 8x8 patches per image, stock


CHUNK = 8  # chunked prefill: max_num_batched_tokens, boundaries inside every image


@pytest.mark.parametrize(
    "spec, via_env, chunked",
    [
        ("encoder-only", False, False),  # the preset: 64 -> 32 patches (4 layers of 8)
        ({"method": "tome", "knob": 3}, True, False),  # ToMe: every layer, proportional attention; ILLAVA_VLLM
        ({"method": "divprune", "knob": 0.3}, False, False),  # the feature stage: after the projector
        ({"encoder_layers": [1, 3], "encoder_removal": 0.25, "recycle": "cluster"}, False, True),
    ],
    ids=["encoder-only", "tome-env", "divprune", "fields-cluster-chunked"],
)
def test_on_equals_the_transformers_backend(llava, batch, spec, via_env, chunked):
    """On equals the transformers backend; one configuration with chunked prefill in chunks of 8
    tokens, whose boundaries fall inside the images."""
    import json

    engine = {"max_num_batched_tokens": CHUNK} if chunked else {}
    if via_env:
        out = run_vllm(llava, batch, MAX_TOKENS, env={"ILLAVA_VLLM": json.dumps(spec)}, **engine)
    else:
        out = run_vllm(llava, batch, MAX_TOKENS, hf_overrides={"illava": spec}, **engine)
    assert "results" in out, out.get("stderr", "")[-4000:]
    expected = reference(llava, [{**r, "illava": spec, "max_tokens": MAX_TOKENS} for r in batch])
    for request, got, want in zip(batch, out["results"], expected):
        placeholders = got["prompt_token_ids"].count(IMAGE_ID)
        if request["images"]:
            assert placeholders == want["visual_tokens"] < 64 * len(request["images"])
        else:
            assert placeholders == 0
    # the first request is scheduled first: its chunks end at multiples of CHUNK, one inside its image
    slots = [i for i, t in enumerate(out["results"][0]["prompt_token_ids"]) if t == IMAGE_ID]
    assert not chunked or any(slots[0] < k * CHUNK <= slots[-1] for k in range(1, slots[-1] // CHUNK + 1))
    check_against_reference(out["results"], expected)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("image", "has an LLM stage"),  # LLaVA's image preset has LLM layers: refused, never cut down
        ("llm-only", "has an LLM stage"),
        ("fastv", "prunes inside the LLM"),
        ({"encoder_layers": [1], "encoder_removal": 8, "llm_layers": [2], "llm_keep_ratio": 0.5}, "llm_layers"),
        ("bogus", "unknown preset or method"),
        ({"encoder_layers": [5], "encoder_removal": 8}, "comes after the layer the model reads"),
    ],
)
def test_what_cannot_run_is_a_clear_error(llava, spec, message):
    out = run_vllm(llava, [], 1, hf_overrides={"illava": spec})
    assert "error" in out
    assert "illava" in out["error"] and message in out["error"], out["error"][-3000:]


def test_a_family_the_plugin_does_not_serve_is_an_error(llava):
    """The same model through vLLM's transformers backend: not the plugin's class, so refused."""
    out = run_vllm(llava, [], 1, model_impl="transformers", hf_overrides={"illava": "encoder-only"})
    assert "error" in out
    assert "does not serve" in out["error"] and "model_impl='transformers'" in out["error"], out["error"][-3000:]
