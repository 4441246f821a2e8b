"""Peer methods: each against a hand-computed small case of its paper's formula (docs/peers.md), and
every method on every family: a batch equals its samples alone, and tokens are reduced."""

import math

import pytest
import torch
from families import FAMILIES, chat

import illava
from illava.merge import attention_with_received_scores
from illava.methods import METHODS, REGISTRY
from illava.peers import bipartite_merge, cells_for, diverse_subset, dominant_contextual, grid_pool, received_from_all
from illava.policy import RandomDrop
from illava.tools import schedule
from illava.tools.budget import Meter, solve


def test_fastv_score_is_the_attention_received_from_all_queries():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 4, 3)  # 2 query heads share 1 key head
    k = torch.randn(1, 1, 4, 3)
    mask = torch.tensor([[False, True, True, True]])  # token 0 is padding
    got = received_from_all(q, k, 0.5, mask)
    logits = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.5
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    allowed = causal & mask[0][None, :]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0)
    expected = probs.mean(1)[0, 1:].sum(0) / 3  # the 3 real queries, heads averaged
    torch.testing.assert_close(got[0], expected)
    assert got[0, 0] == 0


def test_tome_bipartite_matching_and_size_weighted_merge():
    # A = tokens 0, 2, 4; B = tokens 1, 3. Cosine: 0 -> 1 and 2 -> 3 match best (tied), 4 -> 3.
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [-1.0, 0.0]]])
    x = torch.arange(10, dtype=torch.float32).view(1, 5, 2)
    res = bipartite_merge(x, metric, 2)
    assert res.kept.tolist() == [[1, 3, 4]] and res.assign.tolist() == [[0, 0, 1, 1, 2]]
    torch.testing.assert_close(res.tokens[0], torch.stack([(x[0, 0] + x[0, 1]) / 2, (x[0, 2] + x[0, 3]) / 2, x[0, 4]]))
    sized = bipartite_merge(x, metric, 1, sizes=torch.tensor([[3.0, 1, 1, 1, 1]]))
    torch.testing.assert_close(sized.tokens[0, 0], (3 * x[0, 0] + x[0, 1]) / 4)


def test_proportional_attention_makes_a_merged_pair_count_twice():
    """log(size) added to the logits: one token of size 2 draws the attention two copies drew."""
    torch.manual_seed(0)
    q = torch.randn(1, 1, 3, 4)
    k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4)
    duplicated = attention_with_received_scores(q, k[:, :, [0, 0, 1]], v[:, :, [0, 0, 1]], 0.5)[0]
    merged = attention_with_received_scores(q, k, v, 0.5, torch.tensor([math.log(2), 0.0])[None, None, None])[0]
    torch.testing.assert_close(merged, duplicated)


def test_visionzip_dominant_and_contextual_tokens():
    x = torch.tensor([[[5.0, 5.0], [1.0, 0.0], [6.0, 6.0], [0.9, 0.1], [0.1, 0.9], [0.0, 1.0]]])
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.3, 0.4]])
    res = dominant_contextual(x, scores, dominant=2, contextual=2)
    # dominant: 0, 2; the rest 1, 3, 4, 5 -> evenly spaced targets 1 and 5; 3 joins 1, 4 joins 5
    assert res.kept.tolist() == [[0, 1, 2, 5]] and res.assign.tolist() == [[0, 1, 2, 1, 3, 3]]
    expected = torch.stack([x[0, 0], (x[0, 1] + x[0, 3]) / 2, x[0, 2], (x[0, 5] + x[0, 4]) / 2])
    torch.testing.assert_close(res.tokens[0], expected)


def test_divprune_greedy_max_min_diversity():
    angles = torch.tensor([0.0, 10.0, 90.0, 80.0, 180.0]) * math.pi / 180
    x = torch.stack([angles.cos(), angles.sin()], 1)
    # first: 180 deg (farthest from the rest on average), then 0 deg, then 90 deg
    assert diverse_subset(x, 3).tolist() == [0, 2, 4]
    assert diverse_subset(x, 1).tolist() == [4]


def test_pooling_control_averages_grid_cells():
    x = torch.arange(16, dtype=torch.float32).view(1, 16, 1)
    res = grid_pool(x, (4, 4), (2, 2))
    assert res.kept.tolist() == [[0, 2, 8, 10]]
    assert res.tokens[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    assert res.assign[0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    assert cells_for((4, 4), 4) == (2, 2) and cells_for((27, 27), 100) == (10, 10)


def test_random_control_is_fixed_and_batch_independent():
    policy = RandomDrop(seed=3)
    x = torch.randn(20, 4)
    first = policy.select(x, 7)
    assert first.tolist() == policy.select(torch.randn(20, 4), 7).tolist()  # depends on the count only
    assert first.tolist() == sorted(first.tolist()) and len(set(first.tolist())) == 7


def test_methods_apply_by_name_with_their_published_defaults():
    model = FAMILIES[0].make()
    cfg = illava.apply(model, "fastv")
    assert cfg.llm_layers == (2,) and cfg.llm_keep_ratio == 0.5 and cfg.policy.llm_query == "all"
    assert illava.configure(model, "pdrop").llm_layers == (1, 2, 3)
    assert illava.configure(model, "divprune").feature_keep == 0.1
    with pytest.raises(ValueError, match="unknown method"):
        illava.configure(model, "fast-v")


# knob values that reduce tokens on the tiny models (the published defaults are for real sizes)
KNOBS = {"illava": 1.0, "illava-rank": 1.0, "illava-cluster": 1.0, "illava-prune": 1.0, "illava-encoder": 1.0,
         "illava-llm": 1.0, "illava-measured": 1.0, "random-encoder": 1.0, "tome-illava": 1.0,
         "fastv": 0.5, "pdrop": 0.6, "tome": 2, "visionzip": 0.4, "divprune": 0.4, "random": 0.4,
         "pool": 0.3}  # fmt: skip
IMAGE_Q = chat("<image>\nwhat is shown in this image?")
TEXT_Q = chat("describe a cat in one two three words")
SYSTEM_Q = chat("<image>\nwhat color?", system="You are a helpful assistant.")


@pytest.fixture(params=FAMILIES, ids=lambda f: f.name)
def fam(request):
    return request.param


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_on_every_family_batch_equals_singles(fam, photos, method):
    model = fam.make()
    prompts, images = [IMAGE_Q, TEXT_Q, SYSTEM_Q], [photos["cat"], photos["rocket"]]
    if method == "illava-measured":  # its layers come from the tower's measured attention
        schedule.remember(model, schedule.layer_profile(model, fam.build([IMAGE_Q], [photos["cat"]])))
    config = illava.apply(model, illava.configure(model, method, KNOBS[method]))

    def generate(inputs):
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=3, do_sample=False, suppress_tokens=[1, 2], return_dict_in_generate=True,
                output_scores=True,
            )  # fmt: skip
        return out.sequences[:, -3:], torch.stack(out.scores, 1)

    batch_seq, batch_scores = generate(fam.build(prompts, images))
    tokens = illava.stats(model).visual_tokens()
    # illava-llm on a family whose presets have no LLM stage (Qwen-VL at this size) removes nothing
    assert (tokens["after_llm"] < tokens["stock"]) == (config.reduces or method != "illava-llm"), (method, tokens)
    for i, (prompt, image) in enumerate(((IMAGE_Q, [images[0]]), (TEXT_Q, []), (SYSTEM_Q, [images[1]]))):
        seq, scores = generate(fam.build([prompt], image))
        assert torch.equal(seq[0], batch_seq[i]), (method, i)
        torch.testing.assert_close(scores[0], batch_scores[i], atol=2e-4, rtol=2e-4)
    # off is stock: the method's configuration disabled, and removed
    illava.apply(model, config.replace(enabled=False))
    off_seq, off_scores = generate(fam.build(prompts, images))
    illava.remove(model)
    stock_seq, stock_scores = generate(fam.build(prompts, images))
    assert torch.equal(off_seq, stock_seq) and torch.equal(off_scores, stock_scores)


# ------------------------------------------------------------------------------ matched budgets
def _best_on_a_grid(meter, method, target, points=24):
    """Brute force: the least-reducing knob of an even grid whose FLOPs are within the target."""
    m = REGISTRY[method]
    best = None
    for i in range(points + 1):
        knob = m.low + (m.high - m.low) * i / points
        try:
            config = m.config(meter.model, knob)
        except ValueError:
            continue
        p = meter.point(knob, config)
        if p.valid and p.gflops <= target * meter.stock.gflops and (best is None or p.gflops > best.gflops):
            best = p
    return best


@pytest.mark.parametrize("method", ["illava-rank", "fastv", "pdrop", "tome", "visionzip", "divprune", "pool"])
def test_budget_solving_hits_the_target_within_one_token_per_stage(fam, photos, method):
    model = fam.make()
    inputs = dict(fam.build([IMAGE_Q], [photos["cat"]]))
    meter = Meter(model, inputs)
    floor = solve(model, method, 1e-3, inputs, meter=meter)  # the most reducing valid knob
    target = (1 + floor.share) / 2
    solved = solve(model, method, target, inputs, meter=meter)
    assert solved.reached and solved.share <= target, solved
    best = _best_on_a_grid(meter, method, target)
    assert best is not None
    # no grid knob keeps more than one more token at any reduction point while meeting the target
    mine = meter.point(solved.knob, solved.config)
    for key, (n, one) in best.signature.items():
        assert mine.signature[key][0] >= n - one, (key, mine.signature, best.signature)
    meter.close()
    assert not illava.is_applied(model)


def test_an_unreachable_budget_gives_the_method_at_its_floor_and_says_so(photos):
    fam = FAMILIES[0]
    model = fam.make()
    inputs = dict(fam.build([IMAGE_Q], [photos["cat"]]))
    solved = solve(model, "fastv", 0.05, inputs)  # FastV leaves the encoder and two LLM layers whole
    assert not solved.reached and solved.share > 0.05 and solved.knob == REGISTRY["fastv"].high
    assert solve(model, "fastv", 1.0, inputs).knob == REGISTRY["fastv"].low  # stock is within any budget
    with pytest.raises(ValueError, match="share of stock"):
        solve(model, "fastv", 0.0, inputs)
