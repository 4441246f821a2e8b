"""The Hugging Face transformers backend: executes the plans of ``illava.plan`` on stock
transformers models through hooks and class swaps (``illava.patch``), transformers' own masks,
attention implementations and ``DynamicCache``.

- ``illava.hf.llm``: the LLM stage's hooks (decoder input, scoring, merge layers, decoder output);
- ``illava.hf.cache``: what a reduced cache holds per group of decoder layers (``Session``);
- ``illava.hf.masks``: positions, rotary embeddings and attention masks of a reduced sequence;
- ``illava.hf.rope``: post-RoPE queries and keys of Llama-style decoder attention (LLM scoring).
"""

from .._compat import check_transformers_version

check_transformers_version()  # the backend runs on the transformers versions it is tested with
