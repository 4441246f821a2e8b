"""What the plugin refuses of vLLM's serving options while illava is on, with the option to change."""

from __future__ import annotations


def check_serving(vllm_config, family: str) -> None:
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1:
        raise ValueError(
            f"illava.vllm: {family} with illava needs --tensor-parallel-size 1: the encoder stage scores a token by "
            "the attention it receives from every head, and tensor parallelism splits the heads of the vision "
            "tower across ranks"
        )
