"""The algorithm against the formulas of docs/method.md on small hand-computed tensors."""

import math

import pytest
import torch

from illava.merge import attention_with_received_scores, compose_assign, merge, query_scores


def tokens(n, d=2):
    return torch.arange(n * d, dtype=torch.float32).view(1, n, d)


def test_rank_mode_hand_computed():
    x = torch.tensor([[[10.0, 0.0], [0.0, 1.0], [2.0, 2.0], [4.0, 4.0], [6.0, 0.0]]])
    scores = torch.tensor([[0.5, 0.1, 0.3, 0.2, 0.9]])
    # ascending: p0=1 (0.1), p1=3 (0.2), p2=2 (0.3); r=2 -> weights 3,2,1 into p2 = token 2
    res = merge(x, scores, 2, "rank")
    expected_merged = (3 * x[0, 1] + 2 * x[0, 3] + 1 * x[0, 2]) / 6
    assert res.kept.tolist() == [[0, 2, 4]]
    torch.testing.assert_close(res.tokens[0], torch.stack([x[0, 0], expected_merged, x[0, 4]]))
    # tokens 1 and 3 now live in output token 1 (the old token 2)
    assert res.assign.tolist() == [[0, 1, 1, 1, 2]]


def test_prune_mode_drops_lowest_and_keeps_order():
    x = tokens(5)
    res = merge(x, torch.tensor([[0.5, 0.1, 0.3, 0.2, 0.9]]), 2, "prune")
    assert res.kept.tolist() == [[0, 2, 4]]
    torch.testing.assert_close(res.tokens, x[:, [0, 2, 4]])
    assert res.assign.tolist() == [[0, -1, 1, -1, 2]]


def test_cluster_mode_hand_computed():
    # N=6, r=2 -> P=4, Pc=max(1, round(0.05*4))=1: the 4th best token recycles the 2 removed ones
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0], [3.0, 1.0], [0.0, 2.0]]])
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.1, 0.2]])
    res = merge(x, scores, 2, "cluster", neighbours=5)
    c = x[0, 3]
    removed = x[0, [5, 4]]  # descending-score order of the removed tokens
    sim = removed @ c
    w = torch.softmax(sim / math.sqrt(2), 0)
    expected_c = (c + (w[:, None] * removed).sum(0)) / 2
    assert res.kept.tolist() == [[0, 1, 2, 3]]
    torch.testing.assert_close(res.tokens[0, 3], expected_c)
    torch.testing.assert_close(res.tokens[0, :3], x[0, :3])
    assert res.assign.tolist() == [[0, 1, 2, 3, 3, 3]]


def test_cluster_takes_only_m_nearest_and_tracks_unchosen_as_dropped():
    torch.manual_seed(0)
    x = torch.randn(1, 12, 4)
    scores = torch.arange(12, 0, -1, dtype=torch.float32)[None]  # token 0 best
    res = merge(x, scores, 8, "cluster", neighbours=2)  # P=4, Pc=1 (token 3), 8 removed
    c, removed = x[0, 3], x[0, 4:]
    sim = removed @ c
    top = sim.topk(2)
    w = torch.softmax(top.values / 2.0, 0)
    torch.testing.assert_close(res.tokens[0, 3], (c + (w[:, None] * removed[top.indices]).sum(0)) / 2)
    chosen = set((top.indices + 4).tolist())
    for j in range(4, 12):
        assert res.assign[0, j].item() == (3 if j in chosen else -1)


def test_remove_zero_is_identity_and_bad_counts_raise():
    x = tokens(4)
    res = merge(x, torch.rand(1, 4), 0, "rank")
    assert torch.equal(res.tokens, x) and res.kept.tolist() == [[0, 1, 2, 3]]
    with pytest.raises(ValueError):
        merge(x, torch.rand(1, 4), 4, "rank")
    with pytest.raises(ValueError):
        merge(x, torch.rand(1, 4), 1, "nope")


@pytest.mark.parametrize("mode", ["rank", "cluster", "prune"])
def test_batched_rows_are_independent(mode):
    torch.manual_seed(1)
    x, s = torch.randn(3, 10, 8), torch.rand(3, 10)
    both = merge(x, s, 4, mode)
    for i in range(3):
        one = merge(x[i : i + 1], s[i : i + 1], 4, mode)
        torch.testing.assert_close(both.tokens[i], one.tokens[0])
        assert torch.equal(both.assign[i], one.assign[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_preserves_dtype(dtype):
    x = torch.randn(2, 9, 4).to(dtype)
    for mode in ("rank", "cluster", "prune"):
        assert merge(x, torch.rand(2, 9), 3, mode).tokens.dtype == dtype


def test_received_scores_equal_mean_of_softmax_and_output_equals_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 7, 4) for _ in range(3))
    out, received = attention_with_received_scores(q, k, v, 0.5)
    probs = torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1)
    torch.testing.assert_close(received, probs.mean(dim=(1, 2)))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.5).transpose(1, 2)
    torch.testing.assert_close(out, ref)


def test_received_scores_chunking_is_exact(monkeypatch):
    import illava.merge as m

    torch.manual_seed(0)
    q, k, v = (torch.randn(5, 2, 6, 4) for _ in range(3))
    full = attention_with_received_scores(q, k, v, 0.3)
    monkeypatch.setattr(m, "_MAX_PROB_BYTES", 1)  # one row per chunk
    chunked = attention_with_received_scores(q, k, v, 0.3)
    torch.testing.assert_close(full[0], chunked[0])
    torch.testing.assert_close(full[1], chunked[1])


def test_query_scores_gqa_padding_and_several_rows():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 2, 8)  # two query rows per sample (e.g. two packed sequences)
    k = torch.randn(2, 2, 5, 8)
    mask = torch.ones(2, 2, 5, dtype=torch.bool)
    mask[0, :, 0] = False  # padding
    mask[1, 0, 3:] = False  # row 0 of sample 1 sees keys 0..2 only, row 1 sees all
    got = query_scores(q, k, 0.25, mask)
    k_full = k.repeat_interleave(2, dim=1)  # each key head serves 2 query heads
    logits = (q @ k_full.transpose(-1, -2)) * 0.25  # (B, H, S, L)
    logits = logits.masked_fill(~mask[:, None], float("-inf"))
    torch.testing.assert_close(got, torch.softmax(logits, -1).mean(1))
    assert got[0, :, 0].eq(0).all() and got[1, 0, 3:].eq(0).all()
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 2))


def test_compose_assign():
    first = torch.tensor([[0, 0, 1, -1, 2]])  # 5 originals -> 3 tokens
    second = torch.tensor([[0, -1, 0]])  # 3 tokens -> 1 token (token 1 dropped)
    assert compose_assign(first, second).tolist() == [[0, 0, -1, -1, 0]]
