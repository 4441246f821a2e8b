"""What the plugin refuses of vLLM's serving options while illava is on, with the option to change.

Tensor parallelism is served: every rank holds some heads of the vision tower, and the statistics the
encoder stage decides on are combined across the ranks first (``illava.vllm.encoder.across_heads``),
so every rank makes the decision one rank would. Data parallelism runs independent engines (each is
one of these). Pipeline parallelism is refused: the plugin has not been run with the vision tower and
the decoder on different stages, and a count or a position it cannot check is not served.
"""

from __future__ import annotations


def check_serving(vllm_config, family: str) -> None:
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1:
        raise ValueError(
            f"illava.vllm: {family} with illava is not served with --pipeline-parallel-size > 1 (not run with the "
            "vision tower and the decoder on different stages yet); use --tensor-parallel-size, or "
            "--data-parallel-size"
        )


def evs_refused(mm_config) -> None:
    """vLLM's own video pruning (EVS, ``--video-pruning-rate``) and an illava configuration both cut
    the video tokens: ``ValueError`` when both are on."""
    if getattr(mm_config, "video_pruning_rate", None):
        raise ValueError(
            "illava.vllm: --video-pruning-rate (vLLM's EVS) and illava both reduce the video tokens; serve one of "
            "them (unset --video-pruning-rate, or serve without an illava configuration)"
        )
