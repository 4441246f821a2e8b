"""Tools around the core: command line, benchmarks, FLOPs model, pictures, accuracy checks, demo,
lmms-eval models, inputs built without torchvision, bundled architectures.

They use the core's public API (``illava``) and the families' tooling (``illava.tools.families``,
one file per family, reached through ``tools_for``); nothing here asks which family a model is.

They need the ``tools`` extra (``pip install "illava[tools]"``); the trained models and tasks of the
accuracy checks (easy-VQA, digits) are the package ``illava_tasks``.
"""
