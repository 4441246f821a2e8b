"""The OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``, the way to start
vLLM's server with this wheel: its ``vllm`` console script looks for a distribution named ``vllm``)
on 127.0.0.1 with the plugin on answers a chat request with an image, with the reduced count (one
rank, and two tensor-parallel ranks); with ToMe it starts and answers on a model whose images are
smaller than its per-layer count."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import ENV, _env, reference

IMAGE_ID = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except OSError:
        return 0


def _chat(
    folder, name: str, image: str, tmp_path, overrides: dict | None = None, env: dict | None = None, args=()
) -> dict:
    """Start the OpenAI server on ``folder`` (127.0.0.1, a free port; ``args``: more server flags),
    send one chat request with ``image``, stop it; the answer."""
    port = _free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host", "127.0.0.1",
        "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
        "--gpu-memory-utilization", "0.15", "--served-model-name", name,
    ]  # fmt: skip
    if overrides is not None:
        command += ["--hf-overrides", json.dumps(overrides)]
    command += list(args)
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(command, env=_env(**ENV, **(env or {})), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 600
        while _get(f"http://127.0.0.1:{port}/health") != 200:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-5000:]
            assert time.time() < deadline, "the server did not start in 600 s"
            time.sleep(2)
        data = base64.b64encode(open(image, "rb").read()).decode()
        body = {
            "model": name,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                        {"type": "text", "text": "what is this?"},
                    ],
                }
            ],
            "max_tokens": 5,
            "temperature": 0,
            "return_token_ids": True,
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=300) as response:
            assert response.status == 200
            answer = json.loads(response.read())
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    assert isinstance(answer["choices"][0]["message"]["content"], str)
    assert answer["usage"]["completion_tokens"] == 5
    return answer


@pytest.mark.parametrize("ranks", [1, 2])
def test_the_openai_server_answers_a_chat_with_an_image(llava, images, tmp_path, ranks):
    """One rank, and two tensor-parallel ranks (issue 41; ``VLLM_CPU_OMP_THREADS_BIND="0|1"``): the
    same reduced count and the transformers backend's tokens."""
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if ranks == 2 else None
    args = ["--tensor-parallel-size", str(ranks)]
    answer = _chat(llava, "tiny-llava", images["c"], tmp_path, overrides={"illava": "encoder-only"}, env=env, args=args)
    prompt = answer["prompt_token_ids"]
    # the transformers backend on the prompt the server built: the same reduced count and tokens
    text = _detokenized(llava, prompt)
    (want,) = reference(llava, [{"prompt": text, "images": [images["c"]], "illava": "encoder-only", "max_tokens": 5}])
    assert prompt.count(IMAGE_ID) == want["visual_tokens"] == 32
    assert want["prompt_tokens"] == len(prompt) - 32 + 64  # the same prompt, with the stock 64 placeholders
    assert answer["choices"][0]["token_ids"] == want["tokens"]


def test_the_server_with_tome_starts_and_answers_the_smallest_image(qwen2_vl, tmp_path):
    """Issue 42: ILLAVA_VLLM=tome on a Qwen2-VL whose processor allows at most 112x168 px: ToMe's 8
    blocks per layer exceed what the start-up profiling image and a 28x28 image have; the server
    starts and answers, with the smallest image reduced to the one block that always survives."""
    from PIL import Image

    path = tmp_path / "tiny.png"
    Image.new("RGB", (28, 28), (200, 30, 30)).save(path)  # resized up to the processor's 56x56: 2x2 blocks
    answer = _chat(qwen2_vl, "tiny-qwen2-vl", str(path), tmp_path, env={"ILLAVA_VLLM": "tome"})
    assert answer["prompt_token_ids"].count(IMAGE_ID) == 1


def _detokenized(folder, ids: list[int]) -> str:
    """The server's prompt as text, its image placeholders back to one ``<image>`` marker (the tiny
    word-level tokenizer emits no whitespace tokens, so the words joined by spaces give the same ids)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    pieces = []
    for token in tokenizer.convert_ids_to_tokens(ids):
        if token == "<image>" and pieces and pieces[-1] == "<image>":
            continue
        pieces.append(token)
    return " ".join(pieces)
