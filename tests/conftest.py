import os

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from transformers import LlavaOnevisionForConditionalGeneration

from illava.tools.architectures import tiny_config
from illava.tools.inputs import build as build_inputs
from illava.tools.inputs import word_tokenizer

# tiny models: one thread per process is as fast as two, and `pytest -n 2` (pytest-xdist, the
# project's test command) runs two processes side by side on the two cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def chat(text: str, system: str | None = None) -> str:
    sys_part = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{sys_part}<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="session")
def config():
    cfg = tiny_config("tiny-llava-onevision")
    cfg.text_config.initializer_range = 0.2
    cfg.vision_config.initializer_range = 0.2
    return cfg


@pytest.fixture
def make_model(config):
    def make(attn_implementation: str = "sdpa", dtype=torch.float32, seed: int = 0):
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config).eval()
        model.set_attn_implementation(attn_implementation)
        return model.to(dtype)

    return make


@pytest.fixture
def model(make_model):
    return make_model()


@pytest.fixture(scope="session")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="session")
def photos():
    return {
        "astronaut": Image.fromarray(data.astronaut()),  # 512x512
        "cat": Image.fromarray(data.chelsea()),  # 451x300
        "coffee": Image.fromarray(data.coffee()),  # 600x400
        "rocket": Image.fromarray(data.rocket()),  # 427x640 (portrait)
    }


@pytest.fixture(scope="session")
def frames():
    """A short real 'video': a window panning across a photo."""
    img = np.asarray(data.astronaut())
    return [Image.fromarray(img[40 * i : 40 * i + 300, 30 * i : 30 * i + 300]) for i in range(4)]


@pytest.fixture
def build(config, tokenizer):
    def _build(prompts, images=(), videos=()):
        return build_inputs(config, tokenizer, prompts, images, videos)

    return _build
