"""The tasks and trained models illava checks its accuracy on, kept out of the core package.

- ``illava_tasks.easy_vqa``: a small LLaVA-OneVision trained here on PyPI ``easy-vqa`` (the demo's
  model and ``illava eval easy-vqa``);
- ``illava_tasks.digits``: handwritten-digit scenes and clips where answers hang on a few tokens
  (``illava eval digits``);
- ``illava_tasks/models/``: their weights, model cards and training logs (``training/`` made them).

They need the ``tools`` extra (``pip install "illava[tools]"``); ``import illava`` never imports
them.
"""
