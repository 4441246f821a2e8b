"""The plan layer: what each stage decides, as tensors in and tensors out.

Nothing here imports transformers or knows about hooks, masks or caches. A backend (Hugging Face
transformers: ``illava.hf``; vLLM: ``illava.vllm``) computes the inputs (spans, scores, hidden
states), asks the plan what to keep and where it goes, and executes that on its own machinery.

- ``illava.plan.encoder``: one merge step of the encoder stage over a batch of crops (units of
  1, 2x2 or 4x4 patches, a CLS token kept or not) and the bookkeeping of which original unit
  every survivor stands for.
- ``illava.plan.llm``: the LLM stage's decisions for one decoder call: visual spans, which layers
  reduce, which tokens of every span stay, the compaction of rows and the positions of survivors.
"""
