"""illava.tools.encoder_only on a tiny random DINOv2 (with and without registers): the tower inside
a LLaVA with a decoder that never runs; ``encode`` gives the tower's final tokens and the patch ->
token map of the encoder stage; ``patch_grid_features`` rebuilds the grid; ``EncoderMeter`` counts
the encoder's FLOPs for ``budget.solve``."""

import pytest
import torch

import illava
from illava import IllavaConfig
from illava.methods import Method
from illava.tools import budget
from illava.tools.encoder_only import EncoderMeter, EncoderRun, encode, llava_around, patch_grid_features

SIDE, PATCH = 8, 8  # 64 px images: 8x8 patches


def tiny_tower(registers: int = 0, seed: int = 0):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    kw = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2, patch_size=PATCH, image_size=96)
    torch.manual_seed(seed)
    if registers:
        tower = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **kw))
    else:
        tower = Dinov2Model(Dinov2Config(**kw))
    with torch.no_grad():  # random layer scales: a misplaced one would show
        for layer in tower.encoder.layer:
            layer.layer_scale1.lambda1.normal_(0.5, 0.5)
            layer.layer_scale2.lambda1.normal_(0.5, 0.5)
    return tower.eval()


def pixels(n=2, seed=1):
    return torch.randn(n, 3, SIDE * PATCH, SIDE * PATCH, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("registers", [0, 2])
def test_stock_is_the_tower_itself(registers):
    tower = tiny_tower(registers)
    model = llava_around(tower, SIDE * PATCH)
    assert model.model.vision_tower is tower
    x = pixels()
    with torch.inference_mode():
        ref = tower(pixel_values=x).last_hidden_state
    run = encode(model, x)
    assert torch.equal(run.tokens, ref)
    head = 1 + registers
    assert run.head == head and run.grid == (SIDE, SIDE) and run.call is None
    assert torch.equal(run.owner, torch.arange(64).expand(2, 64) + head)
    assert torch.equal(patch_grid_features(run), ref[:, head:])


@pytest.mark.parametrize("registers", [0, 2])
def test_merges_removing_nothing_equal_stock_and_merges_are_traced(registers):
    tower = tiny_tower(registers)
    model = llava_around(tower, SIDE * PATCH)
    x = pixels()
    ref = encode(model, x).tokens
    illava.apply(model, IllavaConfig(encoder_layers=(0, 1, 2, 3), encoder_removal=0))
    run = encode(model, x)
    torch.testing.assert_close(run.tokens, ref, atol=1e-5, rtol=1e-5)
    # merges at every layer, the last included (the tower is read at its last layer)
    illava.apply(model, IllavaConfig(encoder_layers=(1, 3), encoder_removal=(10, 20), recycle="prune"))
    run = encode(model, x)
    head = 1 + registers
    assert run.tokens.shape == (2, head + 34, 32)
    assert run.call.layers == [(1, 2 * (head + 64), 2 * (head + 54)), (3, 2 * (head + 54), 2 * (head + 34))]
    assert (run.owner == -1).sum(1).tolist() == [30, 30]
    assert run.represented.tolist() == [34 / 64, 34 / 64]
    # survivor k stands at original patch positions[k] and that patch is represented by row head + k
    for b in range(2):
        assert torch.equal(run.owner[b, run.positions[b]], torch.arange(34) + head)
    # the head tokens (CLS, registers) ran the whole way: they differ from stock only through attention
    assert not torch.equal(run.tokens[:, 0], ref[:, 0])
    illava.remove(model)
    assert torch.equal(encode(model, x).tokens, ref)


def test_rank_traces_every_patch_and_nearest_rule_ignores_the_trace():
    tower = tiny_tower()
    model = llava_around(tower, SIDE * PATCH)
    illava.apply(model, IllavaConfig(encoder_layers=(2,), encoder_removal=16, recycle="rank"))
    run = encode(model, pixels(1))
    assert run.represented.tolist() == [1.0]  # rank: every removed patch goes to one survivor
    absorbed = run.owner[0][~torch.isin(torch.arange(64), run.positions[0])]
    assert absorbed.unique().numel() == 1
    near = patch_grid_features(run, "nearest")
    kept = run.positions[0]
    torch.testing.assert_close(near[0, kept], run.tokens[0, 1:])
    with pytest.raises(ValueError, match="rule"):
        patch_grid_features(run, "closest")


def test_patch_grid_features_fills_dropped_patches_from_the_nearest_represented_one():
    # a 2x3 grid; tokens rows: 0 = CLS, 1..3 survivors; patch 0 -> 1, patch 2 -> 2, patch 5 -> 3
    tokens = torch.arange(4, dtype=torch.float32).view(1, 4, 1).expand(1, 4, 2).clone()
    owner = torch.tensor([[1, -1, 2, -1, -1, 3]])
    run = EncoderRun(tokens, owner, 1, (2, 3), None, torch.tensor([[0, 2, 5]]))
    got = patch_grid_features(run)[0, :, 0].tolist()
    # patch 1 (0,1): patches 0 and 2 at distance 1 -> the first, 0 -> token 1; patch 3 (1,0): patch 0
    # -> token 1; patch 4 (1,1): patches 0, 2 at sqrt 2, patch 5 at 1 -> token 3
    assert got == [1, 1, 2, 1, 3, 3]


def _hand_macs(tokens_per_layer):
    """Encoder MACs of the tiny tower for (attention tokens, MLP tokens) per layer."""
    d, m = 32, 64
    return sum(4 * n * d * d + 2 * n * n * d + 2 * k * d * m for n, k in tokens_per_layer)


def test_encoder_meter_counts_encoder_flops_and_budget_solve_uses_it():
    tower = tiny_tower()
    model = llava_around(tower, SIDE * PATCH)
    x = pixels(1)
    meter = EncoderMeter(model, x)
    assert meter.stock.gflops == pytest.approx(2 * _hand_macs([(65, 65)] * 4) / 1e9)
    method = Method(
        "prune-L1", "test", "removal", 0.0, 0.0, 63.0,
        lambda model, r: IllavaConfig(encoder_layers=(1,), encoder_removal=int(round(r)), recycle="prune"),
    )  # fmt: skip
    solved = budget.solve(model, method, 0.6, None, meter=meter)
    r = int(round(solved.knob))
    assert solved.reached and solved.share <= 0.6
    n = 65 - r
    assert solved.gflops == pytest.approx(2 * _hand_macs([(65, 65), (65, n), (n, n), (n, n)]) / 1e9)
    # the least reduction under the budget: one patch fewer removed is over it
    over = 2 * _hand_macs([(65, 65), (65, n + 1), (n + 1, n + 1), (n + 1, n + 1)]) / 1e9
    assert over / meter.stock.gflops > 0.6
    assert solved.tokens == {"stock": 65, "after_encoder": n}
    # unreachable: a single merge at the last layer cannot go under half the FLOPs
    last = Method(
        "prune-L3", "test", "removal", 0.0, 0.0, 63.0,
        lambda model, r: IllavaConfig(encoder_layers=(3,), encoder_removal=int(round(r)), recycle="prune"),
    )  # fmt: skip
    floor = budget.solve(model, last, 0.5, None, meter=meter)
    assert not floor.reached and floor.share > 0.5 and floor.tokens["after_encoder"] == 2
    meter.close()
    assert not illava.is_applied(model)
