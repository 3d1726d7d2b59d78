"""zar.learn.engine in process: a Trainer's state is everything needed to continue exactly."""

from __future__ import annotations

import torch

from zar.config import TrainConfig
from zar.learn.data import load_data
from zar.learn.engine import Trainer
from zar.learn.models import build_model

CFG = TrainConfig(data="synthetic", depth=18, image_size=16, epochs=2, device="cpu", precision="fp32")


def new_trainer(data) -> Trainer:
    torch.manual_seed(CFG.seed)
    return Trainer(
        build_model("resnet", CFG.depth, len(data.classes)),
        data.train,
        data.val,
        CFG,
        torch.device("cpu"),
        progress=False,
    )


def test_state_dict_round_trip_continues_as_an_uninterrupted_run():
    data = load_data(CFG)
    uninterrupted = new_trainer(data)
    expected = list(uninterrupted.epochs())

    first = new_trainer(data)
    next(first.epochs())
    state = first.state_dict()
    torch.manual_seed(1234)  # whatever happens in between: the state restores the random streams
    resumed = new_trainer(data)
    resumed.load_state_dict(state)
    (second,) = list(resumed.epochs())

    assert resumed.epoch == 2 and [r.epoch for r in resumed.history] == [1, 2]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        assert getattr(second, key) == getattr(expected[1], key), key
    for name, value in uninterrupted.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert resumed.summary() == uninterrupted.summary()
