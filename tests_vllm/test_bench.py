"""``illava bench --engine vllm --video`` (``illava.tools.vllm_bench.run_video``): stock vLLM, vLLM's
EVS at illava's token count, and illava, alternated on video requests."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("t", [2, 4, 8])
@pytest.mark.parametrize("per_frame", [12, 16, 144])
def test_the_evs_rate_leaves_exactly_illavas_tokens(t, per_frame):
    from vllm.multimodal.video_prune.evs import compute_retained_tokens_count

    from illava.tools.vllm_bench import evs_rate

    total = t * per_frame
    for tokens in range(1, total + 1):
        rate = evs_rate(tokens, t, per_frame)
        if tokens < per_frame or tokens == total:  # EVS keeps every token of the first frame; nothing removed
            assert rate is None
        else:
            assert 0 < rate < 1 and compute_retained_tokens_count(per_frame, t, rate) == tokens


def test_the_video_bench_runs_stock_evs_and_illava_at_equal_tokens(qwen2_5_vl):
    """On the tiny Qwen2.5-VL (4 frames of 112 px: 2 temporal patches of 4x4 blocks): the three
    engines run, EVS and illava give the LLM the same number of video tokens, fewer than stock, and
    the tower is timed in every engine."""
    from illava.tools.vllm_bench import run_video

    report = run_video(str(qwen2_5_vl), "encoder-only", requests=1, repeats=1, max_tokens=2, frames=4, size=112)
    settings = report["settings"]
    assert list(settings) == ["stock", "evs", "illava"]
    tokens = {name: s["visual_tokens_per_request"] for name, s in settings.items()}
    assert tokens["stock"] == [32] and tokens["evs"] == tokens["illava"] and tokens["illava"][0] < 32, tokens
    assert all(s["tower_s"][0] > 0 for s in settings.values())
    assert set(report["ratios"]) == {"evs", "illava", "illava_over_evs"}
