"""The vLLM tests (``illava.vllm``): run in the vLLM venv (``.venv-vllm``, see the README's test
command), after ``tests_vllm/setup_env.py``. Not collected by the main suite (``testpaths = ["tests"]``).

- Tiny random-weight models are built, and the transformers backend's reference outputs computed,
  by ``tests_vllm/reference.py`` under the main test venv's python (transformers >= 5.24, which the
  vLLM venv cannot have): ``ILLAVA_REFERENCE_PYTHON``, default ``.venv/bin/python`` of the checkout.
  Without it the tests fail (they must run in CI, not skip).
- Every vLLM engine runs in its own process (``tests_vllm/vllm_run.py``): stock vLLM is the same
  venv with ``VLLM_PLUGINS=none``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TIMEOUT = 900

# one CPU thread per engine; a small KV cache (GiB) on CPU
ENV = {"OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}


def reference_python() -> str:
    python = os.environ.get("ILLAVA_REFERENCE_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
    if not Path(python).exists():
        pytest.fail(
            f"the transformers reference needs the main test venv's python ({python}: missing); create it with the "
            "README's test command (its first half), or point ILLAVA_REFERENCE_PYTHON at a python with illava's "
            "test dependencies",
            pytrace=False,
        )
    return python


def _env(**extra) -> dict:
    env = {**os.environ, **ENV, **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    return env


def reference(folder: Path, requests: list[dict]) -> list[dict]:
    """The transformers backend's outputs (``reference.py run``) for ``requests``."""
    path = folder.parent / f"reference-{abs(hash(json.dumps(requests, sort_keys=True)))}.json"
    path.write_text(json.dumps(requests))
    proc = subprocess.run(
        [reference_python(), str(HERE / "reference.py"), "run", str(folder), str(path)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_vllm(folder: Path, requests: list[dict], max_tokens: int, stock: bool = False, env=None, **engine) -> dict:
    """One engine in its own process (``vllm_run.py``): ``{"results": [...]}`` or ``{"error": text}``."""
    job = folder.parent / f"job-{os.getpid()}-{abs(hash((json.dumps(requests), json.dumps(engine), stock)))}.json"
    repeat = engine.pop("repeat", 1)
    spec = {"model": str(folder), "engine": engine, "requests": requests, "max_tokens": max_tokens, "repeat": repeat}
    job.write_text(json.dumps(spec))
    extra = dict(env or {})
    if stock:
        extra["VLLM_PLUGINS"] = "none"  # stock vLLM: no general plugin loads
    proc = subprocess.run(
        [sys.executable, str(HERE / "vllm_run.py"), str(job)],
        capture_output=True,
        text=True,
        env=_env(**extra),
        timeout=TIMEOUT,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise AssertionError(f"vllm_run.py printed no result (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    out = json.loads(lines[-1])
    if "error" in out:
        out["stderr"] = proc.stderr
    return out


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, str]:
    """PNG images of different sizes and contents."""
    folder = tmp_path_factory.mktemp("images")
    out = {}
    for name, (h, w, seed) in {"a": (80, 64, 0), "b": (48, 96, 1), "c": (64, 64, 2), "d": (112, 84, 3)}.items():
        pixels = (np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")
        path = folder / f"{name}.png"
        Image.fromarray(pixels).save(path)
        out[name] = str(path)
    return out


@pytest.fixture(scope="session")
def llava(tmp_path_factory) -> Path:
    """The tiny random-weight LLaVA-1.5 (CLIP 64 px of 8x8 patches, 6 layers read at -2; Llama 4 x 128)."""
    return build(tmp_path_factory, "llava")


@pytest.fixture(scope="session")
def qwen2_vl(tmp_path_factory) -> Path:
    """The tiny random-weight Qwen2-VL (4 vision blocks, 2x2 merger; Qwen2 4 x 128)."""
    return build(tmp_path_factory, "qwen2_vl")


@pytest.fixture(scope="session")
def qwen2_5_vl(tmp_path_factory) -> Path:
    """The tiny random-weight Qwen2.5-VL (4 vision blocks, full attention at 1 and 3, windows of 4x4
    blocks; Qwen2 4 x 128)."""
    return build(tmp_path_factory, "qwen2_5_vl")


def build(tmp_path_factory, family: str) -> Path:
    folder = tmp_path_factory.mktemp(family) / "model"
    proc = subprocess.run(
        [reference_python(), str(HERE / "reference.py"), "build", family, str(folder)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    if family.startswith("qwen"):
        qwen_processor(folder)
    return folder


def qwen_processor(folder: Path) -> None:
    """The stock Qwen2-VL processor of the tiny model (made here: its video processor needs
    torchvision, which the main venv lacks)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tokenizer = AutoTokenizer.from_pretrained(folder)
    qwen2_5 = AutoConfig.from_pretrained(folder).model_type == "qwen2_5_vl"
    images = AutoImageProcessor.from_pretrained(folder)
    # frames sized and normalised as the images (the tiny pixel budget), all frames kept: the
    # transformers side packs the same frames (``illava.tools.families.qwen_vl.video_pixels``)
    videos = Qwen2VLVideoProcessor(size=dict(images.size), image_mean=images.image_mean, image_std=images.image_std)
    processor = (Qwen2_5_VLProcessor if qwen2_5 else Qwen2VLProcessor)(
        image_processor=images,
        video_processor=videos,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(folder)


def chat(text: str, marker: str = "<image>", count: int = 1) -> str:
    """A prompt in the tiny tokenizer's chat format with ``count`` image markers before ``text``."""
    return f"<|im_start|>user\n{(marker + chr(10)) * count}{text}<|im_end|>\n<|im_start|>assistant\n"


NEAR_TIE = 1e-3  # log-probability margin under which two float32 backends may pick either token


def compared_greedy(got: dict, want: dict) -> int:
    """Asserts vLLM's greedy tokens (``got``) are the transformers backend's (``want``), step by step,
    up to the first near-tie: a step where either backend's two best tokens are within ``NEAR_TIE``
    in log-probability. The two backends compute attention differently (vLLM's kernels, the
    backend's SDPA / explicit softmax), so at such a step float32 rounding may pick either token and
    the continuations differ from there on. Returns the number of steps compared."""
    steps = 0
    for a, b, margin_a, margin_b in zip(got["tokens"], want["tokens"], got["margins"], want["margins"]):
        if min(margin_a, margin_b) < NEAR_TIE:
            return steps
        assert a == b, (got["tokens"], want["tokens"], steps)
        steps += 1
    return steps


def check_against_reference(results: list[dict], expected: list[dict]) -> None:
    """Every request's greedy tokens equal up to a near-tie (``compared_greedy``), and most steps of
    the batch compared (a test that compares nothing cannot fail)."""
    compared = [compared_greedy(g, w) for g, w in zip(results, expected)]
    total = sum(len(w["tokens"]) for w in expected)
    assert sum(compared) >= 0.6 * total, (compared, total)
