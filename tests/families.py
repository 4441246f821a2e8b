"""Tiny random-weight models of every supported family, and their inputs, for the shared tests.

The families come from their tooling (``illava.tools.families``: ``tiny``): a new family is tested by the shared test
modules as soon as it is registered. Every family gives a model factory, an input builder (prompts
with ``<image>`` / ``<video>`` markers, PIL images, videos as lists of frames), and a configuration
that exercises both stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from illava.families import record_for
from illava.tools.architectures import tiny_config, tiny_configs
from illava.tools.inputs import build, word_tokenizer


@dataclass
class Family:
    name: str  # the model type (a variant of it: the model type, an underscore, the variant)
    architecture: str  # key of illava.tools.architectures.tiny_configs()
    # valid for every tiny model (Qwen2.5-VL's tiny config has full attention at blocks 1 and 3)
    encoder_layers: tuple[int, ...] = (1, 3)
    encoder_removal: int | float = 0.3
    llm_layers: tuple[int, ...] = (1, 2, 3)
    videos: bool = True
    _config: object = field(default=None, repr=False)

    @property
    def config(self):
        if self._config is None:
            cfg = tiny_config(self.architecture)
            cfg.text_config.initializer_range = 0.2
            cfg.vision_config.initializer_range = 0.2
            self._config = cfg
        return self._config

    def make(self, attn: str = "sdpa", dtype=torch.float32, seed: int = 0):
        from transformers import AutoModelForImageTextToText

        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(self.config).eval()
        # stock initialises some projections to zero (Gemma 3's multimodal projector), which would make
        # every image token the same and hide encoder-stage mistakes: random weights instead
        for p in model.parameters():
            if p.dim() == 2 and not p.any():
                with torch.no_grad():
                    p.normal_(0.0, 0.3)
        model.set_attn_implementation(attn)
        return model.to(dtype)

    def build(self, prompts, images=(), videos=(), padding_side: str = "left"):
        return build(self.config, word_tokenizer(padding_side=padding_side), prompts, images, videos)

    def both_stages(self, llm_layers=(2,), keep=0.6, **kw):
        from illava import IllavaConfig

        return IllavaConfig(
            encoder_layers=self.encoder_layers,
            encoder_removal=self.encoder_removal,
            llm_layers=llm_layers,
            llm_keep_ratio=keep,
            **kw,
        )


# named after the tiny configuration: the model type, or the model type and its variant (llava_dinov2);
# videos where the family record says the family takes them
FAMILIES = [
    Family(
        n.removeprefix("tiny-").replace("-", "_").replace(".", "_"),
        n,
        videos=record_for(tiny_config(n).model_type).takes_video,
    )
    for n in sorted(tiny_configs())
]
assert all(f.name.startswith(tiny_config(f.architecture).model_type) for f in FAMILIES)


def chat(text: str, system: str | None = None) -> str:
    sys_part = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{sys_part}<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
