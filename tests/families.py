"""Tiny random-weight models of every supported family, and their inputs, for the shared tests.

Every family gives: a model factory, an input builder (prompts with ``<image>`` / ``<video>``
markers, PIL images, videos as lists of frames), and a configuration that exercises both stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from illava.tools.architectures import tiny_config
from illava.tools.inputs import build, word_tokenizer


@dataclass
class Family:
    name: str
    architecture: str  # key of illava.tools.architectures.TINY
    encoder_layers: tuple[int, ...]  # valid encoder merge layers of the tiny model
    encoder_removal: int | float
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


FAMILIES = [
    Family("llava_onevision", "tiny-llava-onevision", (1, 3), 10),
    Family("qwen2_vl", "tiny-qwen2-vl", (1, 3), 0.3),
    Family("qwen2_5_vl", "tiny-qwen2.5-vl", (1, 3), 0.3),
]


def chat(text: str, system: str | None = None) -> str:
    sys_part = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{sys_part}<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
