"""The plugin under vLLM's tensor parallelism (issue 41), on this machine's CPU build: two ranks, one
core each (``VLLM_CPU_OMP_THREADS_BIND="0|1"``; without it the CPU engine stops on NUMA nodes).

Each rank holds half of the vision tower's heads; the scores and keys the encoder stage decides on
are combined across the ranks (``illava.vllm.encoder.across_heads``), so both ranks make the decision
one rank makes: the placeholder counts and the greedy tokens equal the single-rank engine's and the
transformers backend's (up to the documented near-tie tolerance: the ranks sum in another order).
Qwen2-VL's ``--mm-encoder-tp-mode data`` (every rank runs the whole tower) is served too. Qwen-VL
batches hold images and a video."""

from __future__ import annotations

import pytest
from conftest import chat, check_against_reference, reference, run_vllm

MAX_TOKENS = 6
TWO_RANKS = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


def _counts(results: list[dict], image_id: int) -> list[int]:
    return [r["prompt_token_ids"].count(image_id) for r in results]


@pytest.mark.parametrize("spec", ["encoder-only", {"method": "tome", "knob": 3}], ids=["encoder-only", "tome"])
def test_llava_tensor_parallel_two_ranks_decide_as_one(llava, images, spec):
    batch = [
        {"prompt": chat("what is this?"), "images": [images["a"]]},
        {"prompt": chat("hello there, how are you?", count=0), "images": []},
        {"prompt": chat("compare them", count=2), "images": [images["c"], images["d"]]},
    ]
    one = run_vllm(llava, batch, MAX_TOKENS, hf_overrides={"illava": spec})
    two = run_vllm(llava, batch, MAX_TOKENS, env=TWO_RANKS, hf_overrides={"illava": spec}, tensor_parallel_size=2)
    assert "results" in one, one.get("stderr", "")[-4000:]
    assert "results" in two, two.get("stderr", "")[-4000:]
    assert _counts(two["results"], 1) == _counts(one["results"], 1)
    assert _counts(two["results"], 1)[0] < 64  # 8x8 patches, fewer after the encoder stage
    expected = reference(llava, [{**r, "illava": spec, "max_tokens": MAX_TOKENS} for r in batch])
    assert _counts(two["results"], 1) == [w["visual_tokens"] or 0 for w in expected]
    check_against_reference(two["results"], expected)
    check_against_reference(two["results"], one["results"])


@pytest.fixture(scope="module")
def qwen_sized(tmp_path_factory):
    """Images at multiples of 28 (what the tiny Qwen processor keeps: both backends see the same pixels)."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("qwen-parallel")
    out = {}
    for name, (h, w, seed) in {"big": (112, 112, 5), "wide": (56, 84, 6), "small": (56, 56, 7)}.items():
        path = folder / f"{name}.png"
        Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")).save(path)
        out[name] = str(path)
    out["video"] = str(folder / "video.npy")  # 4 frames of 112x84: 2 temporal patches of 4x3 blocks
    np.save(out["video"], (np.random.RandomState(8).rand(4, 112, 84, 3) * 255).astype("uint8"))
    return out


@pytest.mark.parametrize(
    "family, mode", [("qwen2_vl", "weights"), ("qwen2_vl", "data"), ("qwen2_5_vl", "weights")]
)  # fmt: skip
def test_qwen_vl_tensor_parallel_and_the_data_parallel_encoder(request, qwen_sized, family, mode):
    """``weights``: the tower's heads split over the ranks (scores combined); ``data``
    (``--mm-encoder-tp-mode data``): every rank runs the whole tower on the images."""
    model = request.getfixturevalue(family)
    marker, video = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
    batch = [
        {"prompt": chat("what is this?", marker), "images": [qwen_sized["big"]]},
        {"prompt": chat("compare them", marker, count=2), "images": [qwen_sized["wide"], qwen_sized["small"]]},
        {"prompt": chat("what happens?", video), "videos": [qwen_sized["video"]]},
    ]
    spec = {"method": "tome", "knob": 1}
    two = run_vllm(
        model, batch, MAX_TOKENS, env=TWO_RANKS, hf_overrides={"illava": spec}, tensor_parallel_size=2,
        mm_encoder_tp_mode=mode,
    )  # fmt: skip
    assert "results" in two, two.get("stderr", "")[-4000:]
    expected = reference(model, [{**r, "illava": spec, "max_tokens": MAX_TOKENS} for r in batch])
    counts = [_counts([r], 1)[0] + _counts([r], 2)[0] for r in two["results"]]  # image + video placeholders
    assert counts == [w["visual_tokens"] for w in expected]
    assert counts[2] < 24  # the video's 24 tokens, fewer after ToMe
    check_against_reference(two["results"], expected)
