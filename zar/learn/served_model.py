"""What a logged model is, in torch alone: images in, class probabilities out, class names beside.

This file is copied into every model zar logs (MLflow's ``code_paths``) and is that model's pyfunc
loader, so it imports nothing of zar: ``mlflow.pyfunc.load_model``, ``mlflow models serve`` and the
Model Registry use a zar model where zar is not installed.

- ``Classifier`` is what is exported (``torch.export``, MLflow's pt2 format): pixels as a user has
  them (float32 in [0, 1], channels first, at the run's ``image_size``), normalised with the mean and
  std the run trained with, the network, then softmax. ``mlflow.pytorch.load_model`` returns it.
- ``_load_pyfunc`` (MLflow's loader-module protocol) wraps that program so that a prediction is a
  table: the predicted class's name in ``label``, then one probability column per class name.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch import nn

PROGRAM = "model.pt2"  # what MLflow's pytorch flavour names the exported program
CLASSES = "classes.json"  # beside it: the class names, in the order of the network's outputs


class Classifier(nn.Module):
    """normalise -> network -> softmax, on images of ``channels`` channels (1: grayscale, 3: RGB).

    ``(x - mean) / std`` is the arithmetic zar's data pipeline does for the built-in data, so on
    its validation images this model's predictions are the run's own (folders are normalised by
    multiply-add there: equal within float rounding, 5e-7). A grayscale image is copied to the
    three channels the ResNet stem takes, as training did.
    """

    def __init__(self, network: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        x = x.expand(-1, 3, -1, -1)  # a no-op on RGB
        return torch.softmax(self.network(x), dim=1)


def label_column(classes: list[str]) -> str:
    """The predicted class's column: ``label``, unless a class already has that name."""
    name = "label"
    while name in classes:
        name = "predicted_" + name
    return name


class ClassProbabilities:
    """The exported program as a pyfunc: a batch of images in, a row per image out."""

    def __init__(self, program: nn.Module, classes: list[str]):
        self.program, self.classes = program, classes

    def predict(self, data, params=None):
        import pandas as pd

        if isinstance(data, pd.DataFrame):
            raise TypeError("the model takes a tensor of images (N x C x H x W float32 in [0, 1]), not a table")
        x = torch.from_numpy(np.array(data, dtype=np.float32))  # a copy: served arrays are read-only
        with torch.inference_mode():
            probs = self.program(x).numpy()
        table = pd.DataFrame(probs, columns=self.classes)
        table.insert(0, label_column(self.classes), [self.classes[i] for i in probs.argmax(1)])
        return table


def _load_pyfunc(path: str, model_config=None) -> ClassProbabilities:
    """MLflow's loader-module entry point; ``path``: the model's data folder."""
    program = torch.export.load(os.path.join(path, PROGRAM)).module()
    with open(os.path.join(path, CLASSES)) as f:
        classes = json.load(f)
    return ClassProbabilities(program, classes)
