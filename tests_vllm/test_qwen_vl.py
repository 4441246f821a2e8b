"""Qwen2-VL and Qwen2.5-VL through vLLM with the plugin: off is stock vLLM token for token; on, the
placeholder counts and greedy tokens are the transformers backend's, whose survivors keep their own
M-RoPE positions (vLLM's EVS path: ``recompute_mrope_positions``). Qwen2.5-VL's tower holds blocks in
window order (windows of 4x4 blocks here; its 168x112 image spans two).

Videos: frames of 112x84 (4x3 blocks), 2 frames per temporal patch. Qwen2.5-VL's temporal positions
step by ``tokens_per_second`` (2 here). The two stocks place the text after a video differently when
the video's last temporal position reaches its larger side (vLLM: after its largest position, as
Qwen's reference code; transformers >= 5.3: ``max(h, w)`` after its start), so the videos here keep
below that: Qwen2-VL 8 frames (4 temporal patches), Qwen2.5-VL 4 frames (2, at positions 0 and 2)."""

from __future__ import annotations

import pytest
from conftest import chat, check_against_reference, reference, run_vllm

IMAGE_ID, VIDEO_ID = 1, 2  # the tiny configuration's <|image_pad|>, <|video_pad|>
MAX_TOKENS = 6
MARKER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def media(result: dict) -> int:
    """The image and video placeholders of a request's prompt."""
    return result["prompt_token_ids"].count(IMAGE_ID) + result["prompt_token_ids"].count(VIDEO_ID)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family, request):
    return request.getfixturevalue(family)


@pytest.fixture(scope="module")
def qwen_images(tmp_path_factory):
    """Images at sizes the tiny processor keeps (multiples of 28 within its pixel budget): the two
    backends' image processors then see the same pixels."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("qwen-images")
    out = {}
    sizes = {"wide": (56, 84, 0), "tall": (84, 56, 1), "big": (112, 112, 2), "small": (56, 56, 3), "two": (168, 112, 4)}
    for name, (h, w, seed) in sizes.items():
        path = folder / f"{name}.png"
        Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")).save(path)
        out[name] = str(path)
    return out


@pytest.fixture(scope="module")
def qwen_videos(tmp_path_factory):
    """Videos as decoded frames ``(frames, 112, 84, 3)`` (within the tiny pixel budget: no resize)."""
    import numpy as np

    folder = tmp_path_factory.mktemp("qwen-videos")
    out = {}
    for name, (frames, seed) in {"short": (4, 5), "long": (8, 7)}.items():
        path = folder / f"{name}.npy"
        np.save(path, (np.random.RandomState(seed).rand(frames, 112, 84, 3) * 255).astype("uint8"))
        out[name] = str(path)
    return out


def video_of(family: str, qwen_videos) -> str:
    return qwen_videos["long" if family == "qwen2_vl" else "short"]  # module docstring


@pytest.fixture(scope="module")
def batch(qwen_images, qwen_videos, family):
    """Mixed requests: images of different sizes and aspect ratios, a text-only request, two images in
    one prompt, a video, and an image with a video in one prompt."""
    return [
        {"prompt": chat("what is this?", MARKER), "images": [qwen_images["big" if family == "qwen2_vl" else "two"]]},
        {"prompt": chat("hello there, how are you?", MARKER, count=0), "images": []},
        {"prompt": chat("and this one?", MARKER), "images": [qwen_images["tall"]]},
        {"prompt": chat("compare them", MARKER, count=2), "images": [qwen_images["wide"], qwen_images["small"]]},
        {"prompt": chat("what happens?", VIDEO), "videos": [video_of(family, qwen_videos)]},
        {
            "prompt": chat("is the picture in the video?", f"{MARKER}\n{VIDEO}"),
            "images": [qwen_images["small"]],
            "videos": [qwen_videos["short"]],
        },
    ]


# 2x2 blocks per image: 112x112 -> 4x4 (Qwen2.5-VL: 168x112 -> 6x4), 84x56 -> 3x2, 56x84 -> 2x3, 56x56 -> 2x2;
# a video of 112x84 frames: 4x3 blocks per temporal patch (Qwen2-VL 4 patches, Qwen2.5-VL 2)
STOCK_TOKENS = {"qwen2_vl": [16, 0, 6, 6 + 4, 48, 4 + 24], "qwen2_5_vl": [24, 0, 6, 6 + 4, 24, 4 + 24]}


def test_off_is_stock_vllm_token_for_token(model, family, batch):
    """Off equals stock vLLM token for token, and both equal stock transformers (the two processors see
    the same pixels: the videos' frames are packed as the stock video processor packs them)."""
    stock = run_vllm(model, batch, MAX_TOKENS, stock=True)
    plugin = run_vllm(model, batch, MAX_TOKENS)
    assert "results" in stock, stock.get("stderr", "")[-4000:]
    assert "results" in plugin, plugin.get("stderr", "")[-4000:]
    assert plugin["results"] == stock["results"]
    assert [media(r) for r in stock["results"]] == STOCK_TOKENS[family]
    expected = reference(model, [{**r, "illava": None, "max_tokens": MAX_TOKENS} for r in batch])
    assert [r["prompt_token_ids"] for r in stock["results"]] == [e["prompt_ids"] for e in expected]
    check_against_reference(stock["results"], expected)


@pytest.mark.parametrize(
    "spec",
    [
        "encoder-only",  # the family preset scaled: Qwen2-VL blocks 2, 3 at 16%; Qwen2.5-VL blocks 1, 3 at 29%
        {"method": "tome", "knob": 0.5},  # a 2x2 block at every other mergeable block (proportional attention)
        {"encoder_layers": [1], "encoder_removal": 8, "recycle": "cluster"},  # two 2x2 blocks at block 1
        {"method": "divprune", "knob": 0.5},  # the feature stage
    ],
    ids=["encoder-only", "tome", "count-cluster", "divprune"],
)
def test_on_equals_the_transformers_backend(model, family, batch, spec):
    out = run_vllm(model, batch, MAX_TOKENS, hf_overrides={"illava": spec}, enable_prefix_caching=True, repeat=2)
    assert "results" in out, out.get("stderr", "")[-4000:]
    expected = reference(model, [{**r, "illava": spec, "max_tokens": MAX_TOKENS} for r in batch])
    first, again = out["results"][: len(batch)], out["results"][len(batch) :]
    assert again == first  # the second pass meets vLLM's prefix cache: the same tokens
    for got, want, stock in zip(first, expected, STOCK_TOKENS[family]):
        placeholders = media(got)
        assert placeholders == (want["visual_tokens"] or 0)
        assert placeholders < stock or stock == 0
    check_against_reference(first, expected)


def test_a_chunk_boundary_inside_an_image_or_a_video(model, family, qwen_images, qwen_videos):
    """Chunked prefill with chunks of 8 tokens: the images and videos span chunk boundaries, the
    survivors' positions are written chunk by chunk (``write_survivor_positions``), and counts and
    tokens are the transformers backend's."""
    requests = [
        {
            "prompt": chat("is the picture in the video?", f"{MARKER}\n{VIDEO}"),
            "images": [qwen_images["big"]],
            "videos": [qwen_videos["short"]],
        },
        {"prompt": chat("what happens?", VIDEO), "videos": [video_of(family, qwen_videos)]},
    ]
    spec = "encoder-only"
    out = run_vllm(model, requests, MAX_TOKENS, hf_overrides={"illava": spec}, max_num_batched_tokens=8)
    assert "results" in out, out.get("stderr", "")[-4000:]
    expected = reference(model, [{**r, "illava": spec, "max_tokens": MAX_TOKENS} for r in requests])
    assert [media(got) for got in out["results"]] == [want["visual_tokens"] for want in expected]
    # the first request is scheduled first: its chunks end at multiples of 8, inside its image and video
    ids = out["results"][0]["prompt_token_ids"]
    for kind in (IMAGE_ID, VIDEO_ID):
        slots = [i for i, t in enumerate(ids) if t == kind]
        assert any(slots[0] < k * 8 <= slots[-1] for k in range(1, slots[-1] // 8 + 1)), (kind, slots)
    check_against_reference(out["results"], expected)


def test_what_cannot_run_is_a_clear_error(model, family):
    out = run_vllm(model, [], 1, hf_overrides={"illava": {"encoder_layers": [1], "encoder_removal": 6}})
    assert "error" in out and "multiple of 4" in out["error"], out["error"][-3000:]
    if family == "qwen2_5_vl":  # block 2 attends within windows: not a merge layer
        out = run_vllm(model, [], 1, hf_overrides={"illava": {"encoder_layers": [2], "encoder_removal": 8}})
        assert "error" in out and "merges only at encoder layers [1, 3]" in out["error"], out["error"][-3000:]
        # vLLM's own video pruning (EVS) and illava: one or the other
        out = run_vllm(model, [], 1, hf_overrides={"illava": "encoder-only"}, video_pruning_rate=0.5)
        assert "error" in out and "--video-pruning-rate (vLLM's EVS) and illava" in out["error"], out["error"][-3000:]


def test_tome_at_its_default_serves_the_smallest_and_the_largest_image(model, family, qwen_images):
    """Issue 42: ToMe's 8 blocks per layer is more than a 56x56 image (2x2 blocks) or the largest image
    the tiny processor allows (vLLM's start-up profiling) has: every layer removes at most half the
    blocks, the engine starts, and the counts are the transformers backend's."""
    requests = [
        {"prompt": chat("what is this?", MARKER), "images": [qwen_images["small"]]},
        {"prompt": chat("and this one?", MARKER), "images": [qwen_images["two"]]},
        {"prompt": chat("compare them", MARKER, count=2), "images": [qwen_images["small"], qwen_images["two"]]},
    ]
    out = run_vllm(model, requests, MAX_TOKENS, env={"ILLAVA_VLLM": "tome"})
    assert "results" in out, out.get("stderr", "")[-4000:]
    expected = reference(model, [{**r, "illava": "tome", "max_tokens": MAX_TOKENS} for r in requests])
    counts = [got["prompt_token_ids"].count(IMAGE_ID) for got in out["results"]]
    assert counts == [want["visual_tokens"] for want in expected]
    # at most half the blocks per layer: 2x2 blocks 4 -> 2 -> 1 (-> 1: one block always survives); 6x4 blocks
    # 24 -> 16 -> 8 -> 4 -> 2 (8 asked, then half); Qwen2.5-VL merges at its full-attention blocks 1 and 3
    # only: 4 -> 2 -> 1 and 24 -> 16 -> 8
    assert counts == ([1, 2, 3] if family == "qwen2_vl" else [1, 8, 9]), counts
    check_against_reference(out["results"], expected)


def test_positions_ride_the_embeddings_exactly_in_bfloat16():
    """bfloat16 holds integers exactly only up to 256 (257 comes back as 256): a long video's temporal
    positions pass through the embeddings as two base-256 digits each, exact up to 65,535."""
    import torch

    from illava.vllm.qwen_vl import decode_positions, encode_positions

    positions = torch.tensor([[0, 0, 0], [257, 1, 2], [766, 127, 255], [65535, 300, 4096]])
    assert torch.tensor(257.0).bfloat16().item() == 256  # the loss the encoding avoids
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(decode_positions(encode_positions(positions, dtype)), positions)
    with pytest.raises(RuntimeError, match="beyond what the embeddings carry"):
        encode_positions(torch.tensor([[65536, 0, 0]]), torch.bfloat16)


def test_survivor_positions_are_written_per_image_run_across_a_chunk_boundary():
    """The plugin's own EVS recomputation (vLLM's counted media tokens only, and wrote a second image
    over the first when the first kept fewer tokens than the text before it): every image run of the
    prompt from the chunk's start gets its item's survivors, the first one possibly from mid-image."""
    import torch

    from illava.vllm.qwen_vl import encode_positions, write_survivor_positions

    # text(3) S I I E text(1) S I I I E text(2); S: vision start (6), I: image (1), E: vision end (7)
    ids = [9, 9, 9, 6, 1, 1, 7, 9, 6, 1, 1, 1, 7, 9, 9]
    text = torch.tensor([0, 1, 2, 3, 4, 4, 6, 7, 8, 9, 9, 9, 12, 13, 14])  # final text positions, image placeholders
    positions = text.expand(3, -1).clone()

    def item(thw):
        return torch.cat([torch.zeros(len(thw), 2), encode_positions(torch.tensor(thw), torch.bfloat16).float()], 1)

    a, b = item([[0, 0, 1], [0, 1, 0]]), item([[0, 0, 0], [0, 1, 1], [0, 2, 1]])
    out, pos, delta = write_survivor_positions(ids, [a, b], positions, 0, 1)
    assert [o.shape for o in out] == [(2, 2), (3, 2)]
    assert pos[:, 4:6].tolist() == [[4, 4], [4, 5], [5, 4]]  # after S at 3: (t, h, w) + 4
    assert pos[:, 9:12].tolist() == [[9, 9, 9], [9, 10, 11], [9, 10, 10]]  # after S at 8: + 9
    assert pos[:, [0, 3, 7, 8, 13, 14]].tolist() == [[0, 3, 7, 8, 13, 14]] * 3  # text untouched
    assert delta == 15 - 15
    # a chunk that starts inside the second image (at slot 10): the rest of it only
    out, pos, _ = write_survivor_positions(ids, [b[1:]], positions, 10, 1)
    assert pos[:, 10:12].tolist() == [[9, 9], [10, 11], [10, 10]] and pos[:, 4:6].tolist() == positions[:, 4:6].tolist()


def test_a_tuned_file_is_served_as_the_transformers_backend_applies_it(qwen2_vl, qwen_images, tmp_path):
    """Issue 40: the file ``illava tune --engine vllm`` writes, given to the engine as the spec
    (``--hf-overrides '{"illava": "tuned.json"}'``), serves the setting it chose: counts and tokens as
    ``illava.apply(model, "tuned.json")`` in transformers. The plugin resolves it once per model."""
    from transformers import AutoConfig

    from illava import tuned
    from illava.families import record_for
    from illava.vllm.qwen_vl import stage_of

    hf_config = AutoConfig.from_pretrained(qwen2_vl)
    dims = record_for(hf_config.model_type).dimensions(hf_config)
    path = str(tmp_path / "tuned.json")
    model = {"name": "tiny-qwen2-vl", "model_type": hf_config.model_type, **dims.as_dict()}
    tuned.write(path, {"spec": {"method": "tome", "knob": 1.5}, "model": model, "engine": "vllm"})
    hf_config.illava = path
    assert stage_of(hf_config) is stage_of(hf_config)  # resolved once, not per call
    requests = [
        {"prompt": chat("what is this?", MARKER), "images": [qwen_images["big"]]},
        {"prompt": chat("compare them", MARKER, count=2), "images": [qwen_images["wide"], qwen_images["small"]]},
    ]
    out = run_vllm(qwen2_vl, requests, MAX_TOKENS, hf_overrides={"illava": path})
    assert "results" in out, out.get("stderr", "")[-4000:]
    expected = reference(qwen2_vl, [{**r, "illava": path, "max_tokens": MAX_TOKENS} for r in requests])
    counts = [got["prompt_token_ids"].count(IMAGE_ID) for got in out["results"]]
    assert counts == [want["visual_tokens"] for want in expected]
    assert counts[0] < 16  # 4x4 blocks, fewer after ToMe
    check_against_reference(out["results"], expected)
    wrong = dict(model, llm_depth=model["llm_depth"] + 1)  # tuned for another size: refused, never applied
    tuned.write(path, {"spec": {"method": "tome", "knob": 1.5}, "model": wrong, "engine": "vllm"})
    out = run_vllm(qwen2_vl, [], 1, hf_overrides={"illava": path})
    assert "error" in out and "was tuned for another model" in out["error"], out.get("error", "")[-3000:]
