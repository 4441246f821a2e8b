"""The LLM stage's plan (illava.plan.llm) on small tensors computed by hand."""

import subprocess
import sys

import torch

from illava import IllavaConfig, Policy
from illava.plan.llm import (
    Sequence,
    compact,
    exclude_last,
    follow,
    merge_spans,
    output_rows,
    packed_segments,
    reducing_layers,
    segment_cumsum,
    shift,
    visual_spans,
)

T, F = True, False


def test_the_plan_imports_no_transformers():
    # illava/__init__ imports transformers (the version check): load the plan modules without it
    code = (
        "import importlib.util, sys, types;"
        "pkg = types.ModuleType('illava'); pkg.__path__ = ['illava']; sys.modules['illava'] = pkg;"
        "import illava.plan.llm;"
        "print(sorted(m for m in sys.modules if m.startswith('transformers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=_root())
    assert out.stdout.strip() == "[]"


def _root() -> str:
    import pathlib

    import illava

    return str(pathlib.Path(illava.__file__).parent.parent)


def test_compact_keeps_order_and_pads_on_the_chosen_side():
    keep = torch.tensor([[T, F, T, F], [F, T, T, T]])
    index, mask = compact(keep, pad_left=True)
    assert index.tolist() == [[3, 0, 2], [1, 2, 3]]  # the padding slot points at a dropped token
    assert mask.tolist() == [[F, T, T], [T, T, T]]
    index, mask = compact(keep, pad_left=False)
    assert index.tolist() == [[0, 2, 1], [1, 2, 3]]
    assert mask.tolist() == [[T, T, F], [T, T, T]]


def test_compact_of_nothing_kept_leaves_one_padding_slot():
    index, mask = compact(torch.tensor([[F, F]]))
    assert index.shape == (1, 1) and mask.tolist() == [[F]]


def test_segment_cumsum_restarts_with_every_sequence():
    x = torch.tensor([[1, 0, 1, 1, 0, 1]])
    segments = torch.tensor([[0, 0, 0, 1, 1, 1]])
    assert segment_cumsum(x, segments).tolist() == [[1, 1, 2, 1, 1, 2]]


def test_packed_segments_split_at_position_resets_and_mark_padding():
    positions = torch.tensor([[0, 1, 2, 0, 1, 5]])
    valid = torch.tensor([[T, T, T, T, T, F]])
    assert packed_segments(positions, valid, packed=True).tolist() == [[0, 0, 0, 1, 1, -1]]
    assert packed_segments(positions, valid, packed=False).tolist() == [[0, 0, 0, 0, 0, -1]]
    assert packed_segments(None, valid, packed=True).tolist() == [[0, 0, 0, 0, 0, -1]]


def test_exclude_last_protects_the_scorer_of_every_sequence():
    spans = torch.tensor([[0, 0, 1, 1], [-1, 2, 2, 2]])
    segments = torch.tensor([[0, 0, 1, 1], [-1, 0, 0, 0]])
    assert exclude_last(spans, segments).tolist() == [[0, -1, 1, -1], [-1, 2, 2, -1]]


def test_visual_spans_number_items_by_row_then_position():
    images = torch.tensor([[F, T, T, F, T, T], [T, T, T, T, F, F]])
    videos = torch.tensor([[F, F, F, T, F, F], [F, F, F, F, F, F]])
    # the images' lengths are known: row 1 holds two images back to back (2 + 2)
    spans, items = visual_spans([("image", images, [2, 2, 2, 2]), ("video", videos, None)], 2, 6, "cpu")
    assert spans.tolist() == [[-1, 0, 0, 1, 2, 2], [3, 3, 4, 4, -1, -1]]
    assert items == [("image", 0, 2), ("video", 0, 1), ("image", 0, 2), ("image", 1, 2), ("image", 1, 2)]
    # unknown lengths: runs of consecutive placeholders
    spans, items = visual_spans([("image", images, None)], 2, 6, "cpu")
    assert spans.tolist() == [[-1, 0, 0, -1, 1, 1], [2, 2, 2, 2, -1, -1]]


def test_reducing_layers_are_those_where_a_span_loses_tokens():
    spans = torch.tensor([[0, 0, 0, 0, -1, 1, 1, -1]])
    removed = torch.zeros_like(spans, dtype=torch.bool)
    cfg = IllavaConfig(llm_layers=(1, 2, 3), llm_keep_ratio=(0.5, 1.0, 0.5))
    # spans of 4 and 2: 0.5 -> 2 and 1 at layer 1; 1.0 changes nothing at 2; 0.5 -> 1 and 1 at 3
    assert reducing_layers(cfg, spans, removed) == {1, 3}
    # the encoder stage already emptied two slots of span 0 and one of span 1: 2 -> 1, 1 stays 1
    removed[0, :2] = True
    removed[0, 5] = True
    assert reducing_layers(cfg, spans, removed) == {1}
    assert reducing_layers(IllavaConfig(), spans, removed) == set()


def test_shift_counts_removed_slots_within_each_sequence_and_before():
    removed = torch.tensor([[F, T, T, F, T, F]])
    segments = torch.tensor([[0, 0, 0, 0, 1, 1]])
    assert shift(removed, segments).tolist() == [[0, 1, 2, 2, 1, 1]]
    assert shift(removed, segments, torch.tensor([3])).tolist() == [[3, 4, 5, 5, 4, 4]]


def _sequence(spans, mask=None):
    spans = torch.tensor(spans)
    mask = torch.ones_like(spans, dtype=torch.bool) if mask is None else torch.tensor(mask)
    index = torch.arange(spans.shape[1]).expand_as(spans)
    return Sequence(mask, spans, torch.where(mask, 0, -1), index)


def test_merge_spans_prunes_the_lowest_scored_tokens_of_every_span():
    seq = _sequence([[-1, 0, 0, 0, 0, 1, 1, -1]])
    hidden = torch.arange(8.0).view(1, 8, 1)
    scores = torch.tensor([[9.0, 0.4, 0.1, 0.3, 0.2, 0.5, 0.6, 9.0]])
    cfg = IllavaConfig(llm_layers=(1,), llm_keep_ratio=0.5, recycle="prune")
    out = merge_spans(hidden, scores, seq, 0.5, Policy(), cfg, trace=True)
    # span 0 keeps its two best (positions 1 and 3), span 1 keeps position 6; text stays
    assert out.keep.tolist() == [[T, T, F, T, F, F, T, T]]
    assert out.visual_in == [6] and out.visual_out == [3]
    assert out.step.tolist() == [[0, 1, -1, 3, -1, -1, 6, 7]]
    assert torch.equal(out.hidden, hidden)  # pruning recycles nothing


def test_merge_spans_rank_recycles_into_the_best_removed_neighbour():
    seq = _sequence([[0, 0, 0, 0]])
    hidden = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    cfg = IllavaConfig(llm_layers=(1,), llm_keep_ratio=0.5)
    out = merge_spans(hidden, scores, seq, 0.5, Policy(), cfg, trace=True)
    # r = 2: p0, p1, p2 = positions 0, 1, 2 (ascending score) folded into p2 with weights 3, 2, 1
    assert out.keep.tolist() == [[F, F, T, T]]
    assert torch.allclose(out.hidden[0, 2], torch.tensor([(3 * 1 + 2 * 2 + 1 * 3) / 6]))
    assert out.step.tolist() == [[2, 2, 2, 3]]


def test_sequence_gather_and_query_rows_and_key_mask():
    seq = Sequence(
        torch.tensor([[T, T, T, T, T]]),
        torch.tensor([[0, 0, -1, 1, -1]]),
        torch.tensor([[0, 0, 0, 1, 1]]),
        torch.arange(5)[None],
    )
    assert seq.query_rows().tolist() == [[2, 4]]
    keys = seq.key_mask(seq.query_rows())
    assert keys.tolist() == [[[T, T, T, F, F], [F, F, F, T, T]]]
    stock = torch.tensor([[0, 1, 2, 3, 4]])
    assert seq.key_mask(seq.query_rows(), stock, window=2).tolist() == [[[F, T, T, F, F], [F, F, F, T, T]]]
    kept = seq.gather(torch.tensor([[0, 2, 3, 4]]), torch.tensor([[F, T, T, T]]))
    assert kept.spans.tolist() == [[-1, -1, 1, -1]] and kept.segments.tolist() == [[-1, 0, 1, 1]]
    assert kept.index.tolist() == [[0, 2, 3, 4]]


def test_output_rows_answer_removed_positions_with_the_last_kept_token():
    # 6 fed positions; the decoder input holds positions 0, 2, 3, 5 (1 and 4 emptied by the encoder)
    input_index = torch.tensor([[0, 2, 3, 5]])
    # a merge then dropped decoder-input token 2 (fed position 3)
    seq = Sequence(
        torch.tensor([[T, T, T]]),
        torch.full((1, 3), -1),
        torch.zeros(1, 3, dtype=torch.long),
        torch.tensor([[0, 1, 3]]),
    )
    assert output_rows(input_index, seq, 6).tolist() == [[0, 0, 1, 1, 1, 2]]


def test_follow_composes_source_tracking_across_a_merge():
    previous = torch.tensor([[0, 1, 2, 3]])  # fed position -> token before the merge
    step = torch.tensor([[0, 2, 2, -1]])  # token 1 folded into 2, token 3 dropped
    new_index, new_mask = torch.tensor([[0, 2]]), torch.tensor([[T, T]])
    assert follow(previous, step, new_index, new_mask).tolist() == [[0, 1, 1, -1]]
