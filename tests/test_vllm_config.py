"""The vLLM plugin's configuration (``illava.vllm.config``, no vLLM needed): a spec resolves on a
served model's configuration to what ``illava.configure`` gives the same model in transformers, and
what vLLM cannot run is refused with the change to make. The plugin itself: tests_vllm/."""

import pytest
import torch

import illava
from illava.tools.architectures import tiny_config
from illava.vllm.config import resolve
from illava.vllm.families import llava, qwen_vl

SPECS = [
    ("encoder-only", None),
    ("tome", 3),
    ("visionzip", 0.4),
    ("pool", 0.5),
    ("divprune", 0.3),
    ("random", None),
]


def _model(name):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(tiny_config(name)).eval()


@pytest.mark.parametrize(
    "arch, family", [("tiny-llava", llava), ("tiny-qwen2-vl", qwen_vl), ("tiny-qwen2.5-vl", qwen_vl)]
)
@pytest.mark.parametrize("name, knob", SPECS)
def test_a_spec_resolves_as_illava_configure(arch, family, name, knob):
    model = _model(arch)
    spec = name if knob is None else {"method": name, "knob": knob}
    assert resolve(spec, family(model.config)) == illava.configure(model, name, knob)


def test_field_overrides_and_plain_fields(tmp_path):
    model = _model("tiny-llava")
    family = llava(model.config)
    spec = {"preset": "encoder-only", "recycle": "cluster", "encoder_removal": 0.2}
    assert resolve(spec, family) == illava.configure(model, "encoder-only", recycle="cluster", encoder_removal=0.2)
    fields = {"encoder_layers": [1, 3], "encoder_removal": 8}
    assert resolve(fields, family) == illava.IllavaConfig(encoder_layers=(1, 3), encoder_removal=8)
    assert resolve("off", family) is None and resolve(None, family) is None


@pytest.mark.parametrize(
    "spec, message",
    [
        ("image", "has an LLM stage"),  # LLaVA's image preset: refused, never cut down to its encoder part
        ("llm-only", "has an LLM stage"),
        ("fastv", "prunes inside the LLM"),
        ("illava", "LLM stage vLLM cannot run"),
        ({"encoder_layers": [1], "encoder_removal": 8, "llm_layers": [2]}, "llm_layers"),
        ("bogus", "unknown preset or method"),
        ({"preset": "encoder-only", "knob": 2}, "only a method takes a knob"),
        ({"encoder_layers": [5], "encoder_removal": 8}, "comes after the layer the model reads"),
        ({"preset": "encoder-only", "encoder_removel": 8}, "unknown field"),
    ],
)
def test_what_vllm_cannot_run_is_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve(spec, llava(_model("tiny-llava").config))


def test_qwen2_5_vl_merges_only_at_full_attention_blocks():
    model = _model("tiny-qwen2.5-vl")  # full-attention blocks 1 and 3
    with pytest.raises(ValueError, match="merges only at encoder layers"):
        resolve({"encoder_layers": [2], "encoder_removal": 8}, qwen_vl(model.config))


def test_qwen2_vl_image_preset_without_llm_stage_is_served():
    """Qwen2-VL below 2048 text width has no LLM stage in its presets (the authors' 2B setting): the
    ``image`` preset is then the encoder stage alone, and the plugin serves it as such."""
    model = _model("tiny-qwen2-vl")
    config = resolve("image", qwen_vl(model.config))
    assert config == illava.configure(model, "image") and not config.llm_layers


@pytest.mark.parametrize("arch, family", [("tiny-llava", llava), ("tiny-qwen2-vl", qwen_vl)])
def test_where_a_method_acts_is_what_its_configuration_does_and_what_vllm_serves(arch, family):
    """``Method.stages`` (the one registry of where each method acts) says which stages the built
    configuration turns on, and the plugin serves exactly the methods whose configuration has no LLM
    stage on this family (refusing the others with the reason), the measured one excepted."""
    from illava.methods import REGISTRY

    model = _model(arch)
    for name, method in REGISTRY.items():
        if method.measured:
            with pytest.raises(ValueError, match="profile measured with the transformers backend"):
                resolve(name, family(model.config))
            continue
        config = illava.configure(model, name)
        assert set(method.stages) <= {"encoder", "features", "llm"}
        assert bool(config.encoder_layers) == ("encoder" in method.stages), name
        assert config.features_active == ("features" in method.stages), name
        if "llm" not in method.stages:
            assert not config.llm_layers, name
        if config.llm_layers or method.stages == ("llm",):  # the LLM stage: refused in vLLM, with the reason
            with pytest.raises(ValueError, match="LLM"):
                resolve(name, family(model.config))
        else:
            assert resolve(name, family(model.config)) == config, name


def test_the_plugin_resolves_once_per_model_and_again_when_the_spec_changes(monkeypatch):
    """``once_per_model`` (what the families' ``stage_of`` go through, tests_vllm) builds a served
    model's stage once, not at every image the processor counts; again for another spec or model."""
    from illava.vllm.config import once_per_model, spec_of
    from illava.vllm.families import family

    calls = []

    def build(hf_config):
        calls.append(spec_of(hf_config))
        return resolve(spec_of(hf_config), family(hf_config))

    monkeypatch.setenv("ILLAVA_VLLM", "encoder-only")
    hf_config = _model("tiny-llava").config
    made = [once_per_model(hf_config, build) for _ in range(5)]
    assert len(calls) == 1 and all(m is made[0] for m in made)
    monkeypatch.setenv("ILLAVA_VLLM", '{"method": "tome", "knob": 2}')
    assert once_per_model(hf_config, build) == illava.configure(_model("tiny-llava"), "tome", 2)
    assert len(calls) == 2
    once_per_model(_model("tiny-llava").config, build)  # another served model: its own resolution
    assert len(calls) == 3
