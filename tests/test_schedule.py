"""Fair to the method (issue 38): encoder merge layers chosen by measurement, controls at the same place,
VisionZip's CLS scoring as published."""

import numpy as np
import pytest
import torch
from families import FAMILIES, chat
from PIL import Image

import illava
from illava.plan.encoder import cls_received
from illava.policy import RandomScores
from illava.tools import schedule

IMAGE_Q = chat("<image>\nwhat is shown in this image?")


def _images(n=3, side=64):
    return [Image.fromarray((np.random.RandomState(i).rand(side, side, 3) * 255).astype("uint8")) for i in range(n)]


def _llava(concentrate_from: int):
    """The tiny LLaVA whose CLIP tower attends uniformly (zero queries) before layer
    ``concentrate_from`` and sharply from it on (a constant query against large keys)."""
    fam = next(f for f in FAMILIES if f.name == "llava")
    model = fam.make()
    with torch.no_grad():
        for i, layer in enumerate(model.model.vision_tower.encoder.layers):
            attn = layer.self_attn
            attn.q_proj.weight.zero_()
            attn.q_proj.bias.fill_(0.0 if i < concentrate_from else 1.0)
            if i >= concentrate_from:
                attn.k_proj.weight.mul_(30)
    return fam, model


def test_lift_is_one_when_flat_and_grows_with_concentration():
    assert schedule.lift(torch.ones(50)) == pytest.approx(1.0)
    peaked = torch.tensor([10.0] + [0.0] * 9)  # the top tenth (1 unit) holds everything: 10x its share
    assert schedule.lift(peaked) == pytest.approx(10.0)
    assert schedule.lift(torch.tensor([3.0, 1.0, 0.0, 0.0])) == pytest.approx(0.75 / 0.25)


def test_the_rule_on_a_profile():
    profile = schedule.Profile(tuple(range(8)), (1.1, 1.2, 1.3, 3.0, 5.0, 6.0, 6.5, 7.0), images=4)
    # halfway from 1.1 to 7.0 is 4.05: layer 4 is the first at or above it
    assert schedule.choose_layers(profile, 4) == (4, 5, 6, 7)
    assert schedule.choose_layers(profile, 2) == (4, 5)
    assert schedule.choose_layers(profile, 2, threshold=0.3) == (3, 4)  # 2.87
    assert schedule.choose_layers(profile, 6) == (2, 3, 4, 5, 6, 7)  # moved earlier to fit before the end
    # an early spike (DINOv2-S's layer 0) comes before the flattest layer: the rule starts after it
    spiky = schedule.Profile(tuple(range(7)), (4.5, 1.7, 1.6, 2.3, 3.0, 3.4, 2.0), images=4)
    assert schedule.choose_layers(spiky, 2) == (4, 5)  # from 1.6 (layer 2) halfway to 3.4: 2.5
    with pytest.raises(ValueError, match="threshold"):
        schedule.choose_layers(profile, 2, threshold=0)


@pytest.mark.parametrize("start", [1, 2, 3])
def test_the_rule_finds_where_a_constructed_towers_attention_concentrates(start):
    fam, model = _llava(start)
    profile = schedule.layer_profile(model, fam.build([IMAGE_Q] * 3, _images()))
    lifts = dict(profile.table())
    assert all(lifts[i] == pytest.approx(1.0) for i in range(start)), lifts  # zero queries: flat
    assert all(lifts[i] > 3 for i in profile.layers if i >= start), lifts
    assert schedule.choose_layers(profile, 2) == (start, start + 1)
    assert not illava.is_applied(model)  # the model is left as it was


def test_illava_measured_moves_the_merges_to_the_measured_layers():
    fam, model = _llava(3)
    with pytest.raises(ValueError, match="schedule.measure"):
        illava.configure(model, "illava-measured")
    schedule.remember(model, schedule.layer_profile(model, fam.build([IMAGE_Q] * 2, _images(2))))
    plain, measured = illava.configure(model, "illava"), illava.configure(model, "illava-measured")
    assert len(measured.encoder_layers) == len(plain.encoder_layers)
    assert measured.encoder_layers[0] == min(3, 5 - len(plain.encoder_layers))
    assert measured.encoder_removal == plain.encoder_removal and measured.llm_layers == plain.llm_layers
    # every preset and method takes the measured layers as an option
    for name in ("image", "encoder-only", "tome", "illava-encoder"):
        base = illava.configure(model, name)
        moved = illava.configure(model, name, encoder_layers="measured")
        assert moved == base.replace(encoder_layers=schedule.measured_layers(model, len(base.encoder_layers)))
        assert moved.encoder_layers[0] == min(3, 5 - len(base.encoder_layers)), (name, moved.encoder_layers)
    with pytest.raises(ValueError, match="no encoder stage"):
        illava.configure(model, "llm-only", encoder_layers="measured")
    with pytest.raises(ValueError, match="'measured'"):
        illava.configure(model, "image", encoder_layers="latest")


def test_the_random_encoder_control_has_the_stages_layers_and_counts():
    fam, model = _llava(2)
    for level in (0.5, 1.0, 2.0):
        stage = illava.configure(model, "illava-encoder", level)
        control = illava.configure(model, "random-encoder", level)
        assert control.encoder_layers == stage.encoder_layers and control.encoder_removal == stage.encoder_removal
        assert control.llm_layers == stage.llm_layers == () and control.recycle == stage.recycle
        assert isinstance(control.policy, RandomScores) and stage.policy is None
    inputs = fam.build([IMAGE_Q] * 2, _images(2))
    counts = {}
    for name in ("illava-encoder", "random-encoder"):
        illava.apply(model, name)
        with torch.inference_mode():
            model(**inputs)
        counts[name] = illava.stats(model).encoder[0]["layers"]
    assert counts["illava-encoder"] == counts["random-encoder"]  # same layers, same counts
    # the scores are random but fixed: the same for the same number of units, whatever the batch
    scores = RandomScores().scores("encoder", torch.zeros(3, 16))
    assert torch.equal(scores[0], scores[2])
    assert torch.equal(scores[0], RandomScores().scores("encoder", torch.ones(1, 16))[0])
    assert not torch.equal(scores[0], RandomScores(seed=1).scores("encoder", torch.zeros(1, 16))[0])


def test_cls_received_is_the_first_rows_softmax_averaged_over_heads():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    bias = torch.randn(2, 1, 1, 5)
    rows = [torch.softmax((q[:, h, 0:1] @ k[:, h].transpose(-1, -2)) * 0.5 + bias[:, 0], -1)[:, 0] for h in range(3)]
    want = torch.stack(rows, 1)
    torch.testing.assert_close(cls_received(q, k, 0.5, bias), want.mean(1))


def test_visionzip_ranks_by_the_cls_tokens_attention_on_a_tower_with_one():
    """The scores VisionZip's merge layer ranks by are the CLS row of the stock attention map of that
    layer (eager attention, output_attentions), averaged over heads; iLLaVA's are every query's."""
    fam = next(f for f in FAMILIES if f.name == "llava")
    model = fam.make(attn="eager")
    inputs = fam.build([IMAGE_Q], _images(1))
    tower = model.model.vision_tower
    with torch.inference_mode():
        stock = tower(inputs["pixel_values"], output_attentions=True).attentions
    for method, want in (("visionzip", lambda a: a[:, :, 0].mean(1)), ("illava-encoder", lambda a: a.mean(dim=(1, 2)))):
        config = illava.configure(model, method)
        layer = config.encoder_layers[0]
        illava.apply(model, config)
        forward = schedule._trace(model, inputs) if not config.reduces else _recorded(model, inputs)
        call = forward.units["image"]
        recorded = next(scores for lay, _, scores in call.layers if lay == layer)
        expected = want(stock[layer].float())[0, 1:]  # the patches (after the CLS token)
        torch.testing.assert_close(recorded.float(), expected, atol=1e-5, rtol=1e-4)
        illava.remove(model)


def _recorded(model, inputs):
    from illava.tools.viz import trace

    return trace(model, inputs)[0]


def test_the_two_stage_hybrid_matches_in_the_encoder_and_scores_by_text_in_the_llm():
    """tome-illava: illava's layers and counts; the encoder stage is ToMe's bipartite matching (equal
    to `tome` at the same layers and counts), the LLM stage the paper's."""
    fam, model = _llava(2)
    hybrid, plain = illava.configure(model, "tome-illava"), illava.configure(model, "illava")
    assert (hybrid.encoder_layers, hybrid.encoder_removal, hybrid.llm_layers, hybrid.llm_keep_ratio) == (
        plain.encoder_layers,
        plain.encoder_removal,
        plain.llm_layers,
        plain.llm_keep_ratio,
    )
    inputs = fam.build([IMAGE_Q] * 2, _images(2))

    def encoded(config):
        illava.apply(model, config)
        with torch.inference_mode():
            out = model.model.get_image_features(pixel_values=inputs["pixel_values"])
        illava.remove(model)
        return getattr(out, "pooler_output", out)

    encoder_only = hybrid.replace(llm_layers=(), llm_keep_ratio=1.0)
    tome_here = encoder_only.replace(policy=illava.ToMe())
    a, b = encoded(encoder_only), encoded(tome_here)
    assert torch.isnan(torch.cat(list(a))).any()  # tokens were removed (NaN rows at the stock count)
    torch.testing.assert_close(torch.cat(list(a)), torch.cat(list(b)), equal_nan=True)
    illava.apply(model, hybrid)
    with torch.inference_mode():
        model(**inputs)
    tokens = illava.stats(model).visual_tokens()
    assert tokens["after_llm"] < tokens["after_encoder"] < tokens["stock"]
