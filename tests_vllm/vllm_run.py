"""One vLLM engine in its own process (the tests' way of keeping stock vLLM and the plugin apart:
``VLLM_PLUGINS=none`` in the environment is stock vLLM).

    python tests_vllm/vllm_run.py JOB.json

``JOB``: ``{"model": DIR, "engine": {LLM keyword arguments}, "requests": [{"prompt", "images":
[PNG paths], "videos": [.npy paths of (frames, H, W, 3) uint8]}], "max_tokens": N}``.
Every request of the job goes to one ``LLM.generate`` call (one batch). Prints one JSON line:
``{"results": [{"tokens", "prompt_token_ids"}]}``; an engine that fails to start prints
``{"error": text}`` and exits 1.
"""

from __future__ import annotations

import json
import sys
import traceback


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    import numpy as np
    from PIL import Image
    from vllm import LLM, SamplingParams

    engine = {
        "dtype": "float32",
        "enforce_eager": True,
        "max_model_len": 2048,
        "gpu_memory_utilization": 0.15,
        "seed": 0,
        "limit_mm_per_prompt": {"image": 2, "video": 1},
        **job.get("engine", {}),
    }
    try:
        llm = LLM(model=job["model"], **engine)
    except Exception as error:  # noqa: BLE001 - reported to the test, which checks the message
        print(json.dumps({"error": f"{type(error).__name__}: {error}\n{traceback.format_exc()}"}))
        sys.exit(1)
    prompts = []
    for request in job["requests"]:
        images = [Image.open(p).convert("RGB") for p in request.get("images", [])]
        videos = [with_metadata(np.load(p)) for p in request.get("videos", [])]  # (frames, H, W, 3) uint8
        prompt = {"prompt": request["prompt"]}
        data = {}
        if images:
            data["image"] = images[0] if len(images) == 1 else images
        if videos:
            data["video"] = videos[0] if len(videos) == 1 else videos
        if data:
            prompt["multi_modal_data"] = data
        prompts.append(prompt)
    params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, ignore_eos=True, logprobs=2)
    results = []
    for _ in range(job.get("repeat", 1)):  # a repeat meets vLLM's prefix cache
        for o in llm.generate(prompts, params):
            top = [sorted(step.values(), key=lambda p: -p.logprob) for step in o.outputs[0].logprobs]
            results.append(
                {
                    "tokens": list(o.outputs[0].token_ids),
                    "prompt_token_ids": list(o.prompt_token_ids),
                    "margins": [t[0].logprob - t[1].logprob for t in top],  # top-1 minus top-2 log-probability
                }
            )
    print(json.dumps({"results": results}))


def with_metadata(frames):
    """A decoded video as vLLM's loaders hand it over: the frames and their metadata (2 frames a
    second, every frame kept: what the transformers side packs, ``video_pixels``)."""
    count = len(frames)
    metadata = {
        "total_num_frames": count, "fps": 2.0, "duration": count / 2.0, "video_backend": "opencv",
        "frames_indices": list(range(count)), "do_sample_frames": False,
    }  # fmt: skip
    return frames, metadata


if __name__ == "__main__":
    main()
