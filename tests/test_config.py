import pytest
from transformers import Qwen2Config, Qwen2ForCausalLM

import illava
from illava import IllavaConfig, preset
from illava._compat import check_transformers_version
from illava.adapters.llava_onevision import llava_onevision_config


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
