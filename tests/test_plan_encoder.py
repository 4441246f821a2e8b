"""The encoder plan (``illava.plan.encoder``) on small hand-computed tensors, without any model."""

import sys
from pathlib import Path

import pytest
import torch

from illava import IllavaConfig
from illava.plan.encoder import (
    CropTrace,
    block_order,
    merge_units,
    merged_sizes,
    reduce_units,
    removal_count,
    size_bias,
)
from illava.policy import Policy, Pruning, ToMe


def config(removal, layer=3, recycle="prune"):
    return IllavaConfig(encoder_layers=(layer,), encoder_removal=removal, llm_layers=(), recycle=recycle)


def test_plan_imports_no_backend():
    import subprocess

    # illava/__init__ itself imports the HF backend: load the plan module on its own
    code = (
        "import os, sys, types;"
        "pkg = types.ModuleType('illava'); pkg.__path__ = [os.path.abspath('illava')]; sys.modules['illava'] = pkg;"
        "import illava.plan.encoder;"
        "print([m for m in ('transformers', 'illava.state', 'illava.patch', 'illava.hf.encoder') if m in sys.modules])"
    )
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"


def test_prune_keeps_the_best_units_and_the_cls_token():
    # CLS + 4 patches; received: CLS 9 (never scored), patches 0.4 0.1 0.3 0.2 -> remove 2: patches 1 and 3
    hidden = torch.arange(10, dtype=torch.float32).view(1, 5, 2)
    received = torch.tensor([[9.0, 0.4, 0.1, 0.3, 0.2]])
    out, trace = merge_units(config(2), Policy(), 3, hidden, received, keep_first=1)
    torch.testing.assert_close(out, hidden[:, [0, 1, 3]])
    assert trace.positions.tolist() == [[0, 2]]
    assert trace.assign.tolist() == [[0, -1, 1, -1]]
    assert trace.sizes.tolist() == [[1.0, 1.0]]  # pruned units stand for nothing


def test_units_of_four_score_by_their_mean_and_move_whole():
    # 3 units of 4 tokens, D=1; unit means 0.25, 0.5, 0.1 -> remove 1 unit (4 tokens): unit 2
    hidden = torch.arange(12, dtype=torch.float32).view(1, 12, 1)
    received = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1]])
    step = reduce_units(config(4), Policy(), 3, hidden, received, unit=4)
    torch.testing.assert_close(step.scores, torch.tensor([[0.25, 0.5, 0.1]]))
    assert step.result.kept.tolist() == [[0, 1]]
    torch.testing.assert_close(step.hidden, hidden[:, :8])


def test_rank_recycling_by_unit_and_sizes_and_trace_across_two_steps():
    # 4 units of 1 token, D=2; scores 0.5 0.1 0.3 0.2, "rank" removes 1 and 3 into unit 2 (weights 3, 2, 1)
    x = torch.tensor([[[10.0, 0.0], [0.0, 1.0], [2.0, 2.0], [4.0, 4.0]]])
    received = torch.tensor([[0.5, 0.1, 0.3, 0.2]])
    out, trace = merge_units(config(2, recycle="rank"), Policy(), 3, x, received)
    merged = (3 * x[0, 1] + 2 * x[0, 3] + 1 * x[0, 2]) / 6
    torch.testing.assert_close(out[0], torch.stack([x[0, 0], merged]))
    assert trace.assign.tolist() == [[0, 1, 1, 1]] and trace.positions.tolist() == [[0, 2]]
    assert trace.sizes.tolist() == [[1.0, 3.0]]
    # second step: remove 1 of the 2 survivors (unit 0 scores lower) by pruning
    out2, trace2 = merge_units(config(1), Policy(), 3, out, torch.tensor([[0.1, 0.9]]), trace=trace, record=True)
    torch.testing.assert_close(out2, out[:, [1]])
    assert trace2.positions.tolist() == [[2]]
    assert trace2.assign.tolist() == [[-1, 0, 0, 0]]
    assert trace2.sizes.tolist() == [[3.0]]
    layer, owner, scores = trace2.records[0]
    assert layer == 3 and owner.tolist() == [[-1, 2, 2, 2]]
    assert scores[0, [0, 2]].tolist() == pytest.approx([0.1, 0.9]) and scores[0, [1, 3]].isnan().all()
    assert trace.records == []  # the trace that went in is unchanged


def test_batch_of_crops_decides_per_crop():
    hidden = torch.arange(8, dtype=torch.float32).view(2, 4, 1)
    received = torch.tensor([[0.4, 0.1, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4]])
    out, trace = merge_units(config(0.5), Pruning(), 3, hidden, received)
    assert trace.positions.tolist() == [[0, 2], [2, 3]]
    torch.testing.assert_close(out, torch.tensor([[[0.0], [2.0]], [[6.0], [7.0]]]))
    assert trace.call_layers() == []


def test_removing_every_unit_is_capped_or_fails_clearly_when_strict():
    hidden, received = torch.zeros(1, 5, 2), torch.ones(1, 5)
    out, _ = merge_units(config(4), Policy(), 3, hidden, received, keep_first=1)  # 4 of 4 patches asked
    assert out.shape == (1, 2, 2)  # the kept first token and the last unit (issue 42)
    with pytest.raises(ValueError, match="lower encoder_removal"):
        merge_units(config(4).replace(strict=True), Policy(), 3, hidden, received, keep_first=1)
    assert removal_count(4, 0.9, 1, 3) == 3  # a fraction never removes the last unit
    assert removal_count(10, 8, 4, 3) == 2  # a count is in tokens: 8 tokens = 2 units of 4


def test_weights_reproduce_the_merge():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3)
    step = reduce_units(config(2, recycle="rank"), Policy(), 3, x, torch.rand(2, 6), with_weights=True)
    torch.testing.assert_close(step.weights @ x, step.hidden)
    assert step.weights.shape == (2, 4, 6)


def test_merged_sizes_and_size_bias_by_hand():
    res = type("R", (), {"assign": torch.tensor([[0, 0, -1, 1]]), "kept": torch.tensor([[0, 3]])})()
    sizes = merged_sizes(torch.tensor([[2.0, 1.0, 5.0, 1.0]]), res, 4)
    assert sizes.tolist() == [[3.0, 1.0]]
    bias = size_bias(sizes, 1 + 2 * 4, unit=4, keep_first=1)
    expected = torch.tensor([1.0, 3, 3, 3, 3, 1, 1, 1, 1]).log()
    torch.testing.assert_close(bias[0, 0, 0], expected)
    assert size_bias(None, 9) is None


def test_tome_uses_sizes_and_keys():
    x = torch.tensor([[[1.0], [1.0], [5.0], [1.1]]])
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
    trace = CropTrace.start(1, 4)
    out, trace = merge_units(config(1), ToMe(), 3, x, torch.ones(1, 4), keys=keys, trace=trace)
    assert out.shape == (1, 3, 1) and trace.sizes.sum().item() == 4.0


def test_block_order_of_2x2_blocks():
    order = block_order(4, 2)
    assert order.tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]


@pytest.mark.parametrize(
    "policy, removal, layers",
    [
        (Policy(), 8, (0, 2, 3)),
        (Policy(), 0.3, (1, 2)),
        (ToMe(), 20, (0,)),  # more than half of the units: ToMe merges at most one per odd unit
        (__import__("illava").Pool(), 0.55, (2,)),  # pooling cells: not units - r
        (__import__("illava").VisionZip(), 0.6, (3,)),
    ],
    ids=["rank-count", "rank-fraction", "tome-capped", "pool", "visionzip"],
)
def test_units_after_is_the_count_the_merges_produce(policy, removal, layers):
    """``units_after`` (what vLLM reserves placeholders for before the model runs) equals the units
    ``merge_units`` leaves, step after step, for every policy's own count (``Policy.kept``)."""
    from illava.plan.encoder import units_after

    torch.manual_seed(0)
    cfg = IllavaConfig(encoder_layers=layers, encoder_removal=removal, policy=policy)
    crops, side, d, keep_first = 2, 6, 8, 1
    hidden = torch.randn(crops, keep_first + side * side, d)
    trace = None
    for layer in layers:
        received = torch.rand(crops, hidden.shape[1])
        hidden, trace = merge_units(cfg, policy, layer, hidden, received, 1, keep_first, hidden.clone(), trace)
    assert hidden.shape[1] - keep_first == units_after(cfg, policy, side * side, 1, (side, side))


# the kernels both engines run (issue 36: written once, in the plan layer)


def _reference_attention(q, k, v, scale, bias=None):
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias
    probs = logits.softmax(-1)
    return (probs @ v.float()).transpose(1, 2), probs


def test_attend_and_score_all_queries_cls_and_none():
    from illava.plan.encoder import attend_and_score

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    bias = torch.randn(2, 1, 1, 5)
    want, probs = _reference_attention(q, k, v, 0.5, bias)
    out, received = attend_and_score(q, k, v, 0.5, bias)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(received, probs.mean(dim=(1, 2)))
    out, received = attend_and_score(q, k, v, 0.5, bias, cls=True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(received, probs[:, :, 0].mean(1))  # the CLS token's row alone
    out, received = attend_and_score(q, k, v, 0.5, bias, scores=False)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert received.shape == (2, 5) and not received.any()


def test_to_block_order_moves_every_stream_alike_and_keeps_the_cls_token():
    from illava.plan.encoder import to_block_order

    hidden = torch.arange(17.0)[None, :, None]  # CLS + 4x4 patches
    received, keys = hidden[..., 0] * 10, hidden * 100
    h, r, k = to_block_order(hidden, received, keys, unit=4, keep_first=1)
    want = [0, 1, 2, 5, 6, 3, 4, 7, 8, 9, 10, 13, 14, 11, 12, 15, 16]
    assert h[0, :, 0].tolist() == want
    assert r[0].tolist() == [10 * x for x in want] and k[0, :, 0].tolist() == [100 * x for x in want]
    assert to_block_order(hidden, received, keys, unit=1, keep_first=1)[0] is hidden


def test_frames_attention_is_full_attention_inside_every_frame():
    from illava.plan.encoder import frames_attention

    torch.manual_seed(1)
    unit = 4  # frames of 3, 2 and 3 blocks
    bounds = [0, 12, 20, 32]
    q, k, v = (torch.randn(32, 2, 4) for _ in range(3))
    sizes = torch.tensor([1.0, 2, 1, 3, 1, 1, 2, 1])
    out, received = frames_attention(q, k, v, bounds, 0.3, sizes, unit)
    bias_all = sizes.repeat_interleave(unit).log()
    for a, b in zip(bounds[:-1], bounds[1:]):
        want, probs = _reference_attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), 0.3, bias_all[a:b])
        torch.testing.assert_close(out[a:b], want[0].reshape(b - a, -1))
        torch.testing.assert_close(received[a:b], probs.mean(dim=(1, 2))[0])


@pytest.mark.parametrize("policy", [Policy(), ToMe()])
def test_merge_frames_equals_reducing_every_frame_alone(policy):
    """Frames of one size merge together (a crop per frame): the same decisions as frame by frame."""
    from illava.plan.encoder import merge_frames

    torch.manual_seed(2)
    unit, frames = 4, [4, 6, 4, 4]
    cfg = config(8, recycle="rank")  # 8 tokens: 2 units of 4 per frame
    n = sum(frames) * unit
    hidden, received, keys = torch.randn(n, 3), torch.rand(n), torch.randn(n, 5)
    sizes = torch.tensor([1.0, 2, 1, 1] + [1, 1, 3, 1, 1, 1] + [2, 2, 1, 1] + [1, 1, 1, 4])
    step = merge_frames(cfg, policy, 3, hidden, received, keys, frames, unit, sizes)
    assert step.counts == [2, 4, 2, 2]
    start = 0
    for f, size in enumerate(frames):
        rows = slice(start * unit, (start + size) * unit)
        one = reduce_units(
            cfg, policy, 3, hidden[rows][None], received[rows][None], unit, 0, keys[rows][None],
            sizes=sizes[start : start + size][None],
        )  # fmt: skip
        got = step.frames[f]
        torch.testing.assert_close(got.tokens, one.hidden[0])
        assert got.kept.tolist() == (start + one.result.kept[0]).tolist()
        torch.testing.assert_close(got.sizes, merged_sizes(sizes[start : start + size][None], one.result, size)[0])
        start += size
    torch.testing.assert_close(step.tokens, torch.cat([f.tokens for f in step.frames]))
