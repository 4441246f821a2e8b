import pytest
from transformers import Qwen2Config, Qwen2ForCausalLM

import illava
from illava import IllavaConfig
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
        ({"encoder_layers": (1, 2), "encoder_removal": 400, "strict": True}, r"leaves none.*allowed 0\.\.328"),
        ({"encoder_layers": (1,), "encoder_removal": 729, "strict": True}, "leaves none"),
        ({"llm_layers": (0,)}, r"llm_layers.*1\.\.27"),
        ({"llm_layers": (28,)}, r"llm_layers.*1\.\.27"),
    ],
)
def test_out_of_range_for_model(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IllavaConfig(**kwargs).check_against(**DIMS)


def test_a_removal_a_crop_cannot_give_is_capped_unless_strict():
    # issue 42: an explicit count follows the rule of every crop (all but one unit; ToMe: half)
    IllavaConfig(encoder_layers=(1, 2), encoder_removal=400).check_against(**DIMS)
    IllavaConfig(encoder_layers=(1,), encoder_removal=729).check_against(**DIMS)
    with pytest.raises(ValueError, match=r"tome policy.*allowed 0\.\.364"):
        IllavaConfig(encoder_layers=(1,), encoder_removal=400, policy=illava.policy.ToMe(), strict=True).check_against(
            **DIMS
        )


def test_layer_after_feature_layer_is_rejected():
    with pytest.raises(ValueError, match="after the layer the model reads"):
        IllavaConfig(encoder_layers=(25,), encoder_removal=1).check_against(**{**DIMS, "feature_layer": 24})


def test_presets_reproduce_the_authors_7b_settings():
    img = IllavaConfig.from_preset("image", encoder_depth=26, tokens_per_crop=729, llm_depth=28)
    assert img.encoder_layers == (5, 6, 7, 8) and img.encoder_removal == 92
    assert img.llm_layers == (8,) and img.llm_keep_ratio == 0.70
    vid = IllavaConfig.from_preset("video", encoder_depth=26, tokens_per_crop=729, llm_depth=28)
    assert vid.encoder_layers == (3, 4, 5, 6) and vid.llm_layers == (2,)


def test_presets_scale_to_other_depths():
    half = IllavaConfig.from_preset("image", encoder_depth=26, tokens_per_crop=729, llm_depth=24)  # 0.5B
    assert half.llm_layers == (7,) and half.encoder_layers == (5, 6, 7, 8)
    big = IllavaConfig.from_preset("image", encoder_depth=26, tokens_per_crop=729, llm_depth=80)  # 72B
    assert big.llm_layers == (23,)
    tiny = IllavaConfig.from_preset("image", encoder_depth=6, tokens_per_crop=64, llm_depth=4)
    assert len(set(tiny.encoder_layers)) == 4 and tiny.encoder_removal == 8 and tiny.llm_layers == (1,)
    with pytest.raises(ValueError, match="unknown iLLaVA preset"):
        IllavaConfig.from_preset("fast", encoder_depth=26, tokens_per_crop=729, llm_depth=28)


def test_configure_for_real_architecture_without_weights():
    from transformers import LlavaOnevisionForConditionalGeneration

    with __import__("torch").device("meta"):
        model = LlavaOnevisionForConditionalGeneration(llava_onevision_config("0.5b"))
    cfg = illava.configure(model, "image", recycle="cluster")
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


def test_the_version_gate_guards_the_transformers_backend_not_the_package():
    """With a transformers outside the backend's range (the vLLM plugin's: vLLM 0.32 pins <5.20),
    ``import illava``, the configuration, the plan, the policies and ``illava.vllm``'s configuration
    work; the transformers backend fails at first use with the same message and install command."""
    import subprocess
    import sys
    from pathlib import Path

    code = """
import importlib.metadata as metadata
real = metadata.version
metadata.version = lambda name: "5.19.0" if name == "transformers" else real(name)
import sys
import illava, illava.plan.encoder, illava.vllm.config, illava.vllm.encoder
cfg = illava.IllavaConfig(encoder_layers=(1,), encoder_removal=4)
assert illava.Policy().kept(10, 4) == 6 and "illava.hf" not in sys.modules and "illava.adapters" not in sys.modules
try:
    illava.apply
except ImportError as error:
    print("REFUSED", error)
"""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "REFUSED illava supports transformers >=5.24.0,<5.40.0; found 5.19.0" in out.stdout
    assert 'pip install "transformers>=5.24.0,<5.40.0"' in out.stdout


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
    cfg = IllavaConfig.from_preset("image", encoder_depth=2, tokens_per_crop=16, llm_depth=1)
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
    assert illava.configure(model, illava.IllavaConfig(encoder_layers=(1, 2), encoder_removal=4))
    with pytest.raises(ValueError, match="after the layer the model reads"):
        illava.apply(model, illava.IllavaConfig(encoder_layers=(3,), encoder_removal=4))


def test_qwen_counts_larger_than_a_frame_are_capped_or_fail_clearly_when_strict(photos):
    """Dynamic resolution: a count larger than a frame is capped per frame at run time (one block
    survives; issue 42), or fails clearly in strict mode."""
    from families import FAMILIES, chat

    fam = next(f for f in FAMILIES if f.name == "qwen2_vl")
    model = fam.make()
    inputs = fam.build([chat("<image>\nwhat is this?")], [photos["cat"]])
    illava.apply(model, IllavaConfig(encoder_layers=(1,), encoder_removal=4000))
    model(**inputs)
    assert illava.stats(model).visual_tokens()["after_encoder"] == 1
    illava.apply(model, IllavaConfig(encoder_layers=(1,), encoder_removal=4000, strict=True))
    with pytest.raises(ValueError, match="lower encoder_removal"):
        model(**inputs)


def test_the_public_surface_is_one_way_in():
    """The top level is the user's API: one function builds configurations, presets and methods
    are two separate name lists, and test controls live in illava.testing."""
    assert set(illava.__all__) == {
        "apply", "remove", "stats", "set_enabled", "is_applied", "config_of", "configure",
        "IllavaConfig", "Policy", "FastV", "PDrop", "ToMe", "VisionZip", "DivPrune", "RandomDrop", "Pool",
        "PRESETS", "METHODS",
    }  # fmt: skip
    assert all(hasattr(illava, name) for name in illava.__all__)
    assert not set(illava.PRESETS) & set(illava.METHODS)
    assert {"image", "video", "encoder-only", "llm-only", "off"} == set(illava.PRESETS)
    assert {"illava", "fastv", "pdrop", "tome", "visionzip", "divprune", "random", "pool"} <= set(illava.METHODS)
    for gone in ("preset", "method_config", "InvertedScores"):
        assert not hasattr(illava, gone), gone
    assert "resolve_config" not in illava.__all__ and "resolve_config" not in dir(illava)  # deprecated, unlisted
    from illava.testing import InvertedScores

    assert issubclass(InvertedScores, illava.Policy)


def _meta_onevision():
    from transformers import LlavaOnevisionForConditionalGeneration

    with __import__("torch").device("meta"):
        return LlavaOnevisionForConditionalGeneration(llava_onevision_config("0.5b"))


def test_an_unknown_name_lists_presets_and_methods_separately():
    model = _meta_onevision()
    with pytest.raises(ValueError) as error:
        illava.configure(model, "turbo")
    message = str(error.value)
    assert "'turbo'" in message
    presets = message.split("presets: ")[1].split(";")[0].split(", ")
    methods = message.split("methods: ")[1].split(", ")
    assert presets == list(illava.PRESETS) and methods == list(illava.METHODS)
    with pytest.raises(ValueError, match="presets: image, video"):
        illava.apply(model, "turbo")


def test_resolve_config_is_a_deprecated_alias_of_configure():
    """``resolve_config`` (``configure``'s name before 0.2.0, which removed it without an alias) is
    back for the 0.3 releases as a deprecated alias: it warns and gives what ``configure`` gives."""
    model = _meta_onevision()
    with pytest.warns(DeprecationWarning, match=r"illava\.configure"):
        cfg = illava.resolve_config(model, "video", llm_keep_ratio=0.4)
    assert cfg == illava.configure(model, "video", llm_keep_ratio=0.4)
    with pytest.warns(DeprecationWarning):
        assert illava.resolve_config(model) == illava.configure(model, "image")


def test_configure_takes_a_preset_a_method_with_its_knob_or_a_config():
    model = _meta_onevision()
    assert illava.configure(model, "image") == IllavaConfig.from_preset(
        "image", encoder_depth=26, tokens_per_crop=729, llm_depth=24
    )
    assert illava.configure(model, "fastv").llm_keep_ratio == 0.5
    assert illava.configure(model, "fastv", 0.25).llm_keep_ratio == 0.25
    assert illava.configure(model, "fastv", 0.25, recycle="prune").recycle == "prune"
    given = IllavaConfig(llm_layers=(3,), llm_keep_ratio=0.5)
    assert illava.configure(model, given, llm_keep_ratio=0.4) == given.replace(llm_keep_ratio=0.4)
    with pytest.raises(TypeError, match="only a method takes a knob"):
        illava.configure(model, "image", 0.5)
    with pytest.raises(TypeError, match="preset name, a method name or an IllavaConfig"):
        illava.configure(model, 3)
