"""illava under ``torch.compile``: a call that removes nothing compiles as stock (``fullgraph=True``
included); a call that removes tokens runs eagerly, giving the eager result (a graph break), or under
``fullgraph=True`` Dynamo's error with illava's reason; never a silently stock or half-reduced result.

Stock LLaVA-OneVision and Qwen2-VL cannot compile an image prompt with ``fullgraph=True`` (Dynamo
stops in their vision code): there, illava fails exactly when stock does.
"""

import copy

import pytest
import torch
from families import FAMILIES, chat

import illava
from illava import IllavaConfig

IMAGE_Q = chat("<image>\nwhat is shown in this image?")
COMPILED = [f for f in FAMILIES if f.name in ("llava_onevision", "qwen2_vl")]
REASON = "illava removes tokens in this forward"


@pytest.fixture(params=COMPILED, ids=lambda f: f.name)
def fam(request):
    return request.param


def compiled(fn, inputs, fullgraph=True):
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            return torch.compile(fn, fullgraph=fullgraph, backend="eager")(**inputs)
    finally:
        torch._dynamo.reset()


def eager(fn, inputs):
    with torch.inference_mode():
        return fn(**inputs)


def outcome(fn, inputs, fullgraph):
    """The logits, or the type of the exception compiling raised."""
    try:
        return compiled(fn, inputs, fullgraph).logits
    except Exception as error:  # noqa: BLE001 - stock's own compile errors are compared, not judged
        return type(error)


def text_inputs():
    ids = torch.randint(10, 200, (1, 12))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_a_text_only_prompt_compiles_fullgraph_as_stock_with_the_llm_stage_on(fam):
    model = fam.make()
    inputs = text_inputs()
    stock = compiled(model.forward, inputs).logits
    for config in (IllavaConfig(llm_layers=(1,), llm_keep_ratio=0.5), fam.both_stages(llm_layers=(1, 2))):
        illava.apply(model, config)
        assert torch.equal(compiled(model.forward, inputs).logits, stock)


def test_an_image_prompt_under_a_configuration_that_removes_nothing_compiles_as_stock(fam, photos):
    stock_model = fam.make()
    model = fam.make()
    inputs = fam.build([IMAGE_Q], [photos["cat"]])
    stock = {fullgraph: outcome(stock_model.forward, inputs, fullgraph) for fullgraph in (True, False)}
    assert not isinstance(stock[False], type)  # with graph breaks, stock compiles
    for config in (IllavaConfig(), IllavaConfig(llm_layers=(1,), llm_keep_ratio=1.0)):
        illava.apply(model, config)
        assert not illava.config_of(model).reduces
        for fullgraph in (True, False):
            ours = outcome(model.forward, inputs, fullgraph)
            if isinstance(stock[fullgraph], type):  # stock cannot compile it either: the same failure
                assert ours is stock[fullgraph]
            else:
                assert torch.equal(ours, stock[fullgraph])
    assert torch.equal(stock[False], eager(stock_model, inputs).logits)


CONFIGS = {
    "encoder": lambda fam: fam.both_stages(llm_layers=(1,)).replace(llm_layers=(), llm_keep_ratio=1.0),
    "llm": lambda fam: IllavaConfig(llm_layers=(1,), llm_keep_ratio=0.5),
    "both": lambda fam: fam.both_stages(llm_layers=(1,)),
}


@pytest.mark.parametrize("stage", list(CONFIGS))
def test_an_image_prompt_that_removes_tokens_runs_eagerly_or_says_why(fam, photos, stage):
    model = fam.make()
    inputs = fam.build([IMAGE_Q, chat("<image>\nand this one?")], [photos["cat"], photos["rocket"]])
    illava.apply(model, CONFIGS[stage](fam))
    reference = eager(model, inputs).logits
    tokens = illava.stats(model).visual_tokens()
    assert tokens["after_llm"] < tokens["stock"]
    with pytest.raises(Exception, match=REASON):
        compiled(model.forward, inputs, fullgraph=True)
    out = compiled(model.forward, inputs, fullgraph=False).logits
    torch.testing.assert_close(out, reference, atol=0, rtol=0, equal_nan=True)
    assert illava.stats(model).visual_tokens() == tokens


def test_vision_features_called_alone_run_eagerly_when_they_remove_tokens(fam, photos):
    model = fam.make()
    inputs = fam.build([IMAGE_Q], [photos["cat"]])
    illava.apply(model, fam.both_stages())
    names = ("pixel_values", "image_sizes", "image_grid_thw")
    pixels = {k: v for k, v in inputs.items() if k in names}
    reference = eager(model.model.get_image_features, pixels).pooler_output
    with pytest.raises(Exception, match=REASON):
        compiled(model.model.get_image_features, pixels, fullgraph=True)
    out = compiled(model.model.get_image_features, pixels, fullgraph=False).pooler_output
    for a, b in zip(out, reference):
        torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)


def test_continuing_a_reduced_cache_compiled_runs_eagerly_or_says_why(fam, photos):
    from transformers import DynamicCache

    model = fam.make()
    inputs = fam.build([IMAGE_Q], [photos["cat"]])
    illava.apply(model, fam.both_stages(llm_layers=(1,)))
    with torch.inference_mode():
        out = model(**inputs, past_key_values=DynamicCache(config=model.config.text_config), use_cache=True)
    ids = torch.full((1, 1), 42)
    mask = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
    positions = model._prepare_position_ids_for_generation(torch.cat([inputs["input_ids"], ids], 1), {})[..., -1:]
    step = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    reference = eager(model, dict(step, past_key_values=copy.deepcopy(out.past_key_values))).logits
    with pytest.raises(Exception, match=REASON):
        compiled(model.forward, dict(step, past_key_values=copy.deepcopy(out.past_key_values)))
    ours = compiled(model.forward, dict(step, past_key_values=copy.deepcopy(out.past_key_values)), fullgraph=False)
    torch.testing.assert_close(ours.logits, reference, atol=0, rtol=0)
