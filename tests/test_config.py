import pytest
from transformers import Qwen2Config, Qwen2ForCausalLM

import illava
from illava import IllavaConfig, preset
from illava._compat import check_transformers_version
from illava.tools.families.llava_onevision import llava_onevision_config


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"recycle": "avg"}, "recycle"),
        ({"llm_keep_ratio": 0.0}, "llm_keep_ratio"),
        ({"llm_keep_ratio": 1.5}, "llm_keep_ratio"),
        ({"encoder_removal": -1}, "encoder_removal"),
        ({"encoder_removal": 1.0}, "encoder_removal"),
        ({"encoder_layers": (1, 1)}, "encoder_layers"),
        ({"encoder_layers": (1, 2), "encoder_removal": (1, 2, 3)}, "encoder_removal"),
        ({"llm_layers": (2,), "llm_keep_ratio": (0.5, 0.5)}, "llm_keep_ratio"),
        ({"cluster_neighbours": 0}, "cluster_neighbours"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        IllavaConfig(**kwargs)


DIMS = {"encoder_depth": 26, "tokens_per_crop": 729, "llm_depth": 28, "feature_layer": 25}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"encoder_layers": (26,), "encoder_removal": 1}, r"encoder_layers.*0\.\.25"),
        ({"encoder_layers": (1, 2), "encoder_removal": 400}, r"leaves none.*allowed 0\.\.328"),
        ({"encoder_layers": (1,), "encoder_removal": 729}, "leaves none"),
        ({"llm_layers": (0,)}, r"llm_layers.*1\.\.27"),
        ({"llm_layers": (28,)}, r"llm_layers.*1\.\.27"),
    ],
)
def test_out_of_range_for_model(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IllavaConfig(**kwargs).check_against(**DIMS)


def test_layer_after_feature_layer_is_rejected():
    with pytest.raises(ValueError, match="after the layer the model reads"):
        IllavaConfig(encoder_layers=(25,), encoder_removal=1).check_against(**{**DIMS, "feature_layer": 24})


def test_presets_reproduce_the_authors_7b_settings():
    img = preset("image", encoder_depth=26, tokens_per_crop=729, llm_depth=28)
    assert img.encoder_layers == (5, 6, 7, 8) and img.encoder_removal == 92
    assert img.llm_layers == (8,) and img.llm_keep_ratio == 0.70
    vid = preset("video", encoder_depth=26, tokens_per_crop=729, llm_depth=28)
    assert vid.encoder_layers == (3, 4, 5, 6) and vid.llm_layers == (2,)


def test_presets_scale_to_other_depths():
    half = preset("image", encoder_depth=26, tokens_per_crop=729, llm_depth=24)  # 0.5B
    assert half.llm_layers == (7,) and half.encoder_layers == (5, 6, 7, 8)
    big = preset("image", encoder_depth=26, tokens_per_crop=729, llm_depth=80)  # 72B
    assert big.llm_layers == (23,)
    tiny = preset("image", encoder_depth=6, tokens_per_crop=64, llm_depth=4)
    assert len(set(tiny.encoder_layers)) == 4 and tiny.encoder_removal == 8 and tiny.llm_layers == (1,)
    with pytest.raises(ValueError, match="unknown iLLaVA preset"):
        preset("fast", encoder_depth=26, tokens_per_crop=729, llm_depth=28)


def test_resolve_config_for_real_architecture_without_weights():
    from transformers import LlavaOnevisionForConditionalGeneration

    with __import__("torch").device("meta"):
        model = LlavaOnevisionForConditionalGeneration(llava_onevision_config("0.5b"))
    cfg = illava.resolve_config(model, "image", recycle="cluster")
    assert cfg.llm_layers == (7,) and cfg.recycle == "cluster" and cfg.encoder_removal == 92


def test_unsupported_model_lists_supported_classes():
    model = Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=32,
        )
    )
    with pytest.raises(TypeError, match="LlavaOnevisionForConditionalGeneration"):
        illava.apply(model)


def test_transformers_version_gate():
    check_transformers_version("5.24.0")
    with pytest.raises(ImportError, match="transformers >=5.24.0"):
        check_transformers_version("4.57.1")
    with pytest.raises(ImportError, match="pip install"):
        check_transformers_version("5.40.0")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"llm_keep_ratio": "0.5"}, "llm_keep_ratio"),
        ({"llm_layers": (2,), "llm_keep_ratio": ("0.5",)}, "llm_keep_ratio"),
        ({"cluster_neighbours": 2.5}, "cluster_neighbours"),
        ({"cluster_neighbours": True}, "cluster_neighbours"),
        ({"cluster_fraction": "0.1"}, "cluster_fraction"),
        ({"enabled": "no"}, "enabled"),
        ({"enabled": 0}, "enabled"),
        ({"encoder_layers": "12"}, "encoder_layers"),
        ({"encoder_layers": (1.5,)}, "encoder_layers"),
        ({"encoder_layers": (True,)}, "encoder_layers"),
        ({"encoder_removal": "92"}, "encoder_removal"),
        ({"encoder_removal": True}, "encoder_removal"),
        ({"recycle": None}, "recycle"),
        ({"policy": "inverted"}, "policy"),
    ],
)
def test_values_of_the_wrong_type_are_rejected_at_construction(kwargs, field):
    """Wrong types fail when the configuration is made, not later inside a forward pass."""
    with pytest.raises(ValueError, match=field):
        IllavaConfig(**kwargs)


def test_block_families_take_counts_in_multiples_of_their_unit():
    with pytest.raises(ValueError, match="multiple of 4"):
        IllavaConfig(encoder_layers=(1,), encoder_removal=6).check_against(**{**DIMS, "tokens_per_crop": 0, "unit": 4})
    IllavaConfig(encoder_layers=(1,), encoder_removal=8).check_against(**{**DIMS, "tokens_per_crop": 0, "unit": 4})


def test_presets_for_very_small_models_have_no_impossible_stage():
    """A one-layer decoder has no LLM stage (layer k is scored by layer k-1): the preset drops it
    instead of failing with an empty range, and an explicit request says why."""
    cfg = preset("image", encoder_depth=2, tokens_per_crop=16, llm_depth=1)
    assert cfg.llm_layers == () and cfg.encoder_layers
    with pytest.raises(ValueError, match="decoder has 1 layer"):
        IllavaConfig(llm_layers=(1,), llm_keep_ratio=0.5).check_against(**{**DIMS, "llm_depth": 1})


def test_feature_layers_of_mixed_signs_bound_the_encoder_stage():
    """With vision_feature_layer=[-1, 3] the model reads the output of layer 2 as well: a merge
    after it would make the selected hidden states disagree in length."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from illava.tools.architectures import tiny_config

    cfg = tiny_config("tiny-llava-onevision")
    cfg.vision_feature_layer = [-1, 3]
    model = LlavaOnevisionForConditionalGeneration(cfg)
    assert illava.resolve_config(model, illava.IllavaConfig(encoder_layers=(1, 2), encoder_removal=4))
    with pytest.raises(ValueError, match="after the layer the model reads"):
        illava.apply(model, illava.IllavaConfig(encoder_layers=(3,), encoder_removal=4))


def test_qwen_counts_that_leave_no_block_fail_clearly(photos):
    """Dynamic resolution: a count larger than a frame is checked per frame, at run time."""
    from families import FAMILIES, chat

    fam = next(f for f in FAMILIES if f.name == "qwen2_vl")
    model = fam.make()
    illava.apply(model, IllavaConfig(encoder_layers=(1,), encoder_removal=4000))
    with pytest.raises(ValueError, match="lower encoder_removal"):
        model(**fam.build([chat("<image>\nwhat is this?")], [photos["cat"]]))
