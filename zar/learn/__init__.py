"""What learns, in torch alone: the data, the model, the loop, and what a model costs.

- ``data`` (with ``imagecache``): the digits, synthetic images or an image folder, split and normalised;
- ``models``: the one configurable ResNet, each architecture a set of switches (zar.variants);
- ``engine``: the training loop and evaluation, returning numbers; ``distributed``: torchrun's ranks;
- ``measure``: parameters, FLOPs, latency and memory of one architecture, in a process of its own.

Nothing here imports MLflow, zar.tracking or zar.analysis (tests/test_structure.py holds it to that):
zar.training and zar.recording decide what of it is recorded.
"""
