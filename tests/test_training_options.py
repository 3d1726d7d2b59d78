"""Options for longer runs (issue 11): lr schedule, early stopping, label smoothing, augmentation, MixUp/CutMix.

In-process Trainers on the synthetic data, and ``zar train`` through the CLI on a real SQLite store.
Off (the defaults), the options leave training exactly as it was: the first test holds that bit for bit.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, OneCycleLR, SequentialLR
from torch.utils.data import DataLoader

from zar import recording
from zar.config import ConfigError, TrainConfig, load_config
from zar.learn import engine
from zar.learn.data import IMAGENET_MEAN, IMAGENET_STD, load_data
from zar.learn.engine import (
    Augment,
    Evaluation,
    Precision,
    Trainer,
    make_optimizer,
    make_scheduler,
    normalisation,
    train_one_epoch,
)
from zar.learn.models import build_model

from helpers import TINY, all_runs, epochs, runs_of

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
CFG = TrainConfig(data="synthetic", depth=18, image_size=16, epochs=2, device="cpu", precision="fp32")
NUMBERS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")


@pytest.fixture(scope="module")
def data():
    return load_data(CFG)


def new_trainer(data, cfg: TrainConfig) -> Trainer:
    torch.manual_seed(cfg.seed)
    model = build_model("resnet", cfg.depth, len(data.classes))
    return Trainer(model, data.train, data.val, cfg, CPU, progress=False, num_classes=len(data.classes))


# --- off, nothing changes ---------------------------------------------------------------------------


def reference_run(data, cfg: TrainConfig) -> tuple[list[tuple[float, float, float, float]], nn.Module]:
    """The Trainer's loop as it was before these options existed (commit b5a6506), written out:
    seeded model and shuffling, fused AdamW, plain cross entropy, evaluation in batches of 256."""
    torch.manual_seed(cfg.seed)
    model = build_model("resnet", cfg.depth, len(data.classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    drop_last = len(data.train) % cfg.batch_size == 1
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(data.train, cfg.batch_size, shuffle=True, generator=generator, drop_last=drop_last)
    numbers = []
    for _ in range(cfg.epochs):
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        # The progress bar (tqdm.auto's asyncio tqdm) makes an iterator of the loader in its constructor
        # and drops it: one draw from the shuffling generator per epoch, before the epoch's own.
        iter(loader)
        for x, y in loader:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        model.eval()
        with torch.inference_mode():
            val_loss, val_correct, n = 0.0, 0, 0
            for x, y in DataLoader(data.val, 256):
                logits = model(x)
                val_loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
                val_correct += (logits.argmax(1) == y).sum().item()
                n += len(y)
        numbers.append((loss_sum / seen, correct / seen, val_loss / n, val_correct / n))
    return numbers, model


def test_with_the_defaults_training_is_bit_identical_to_before_the_options(data):
    cfg = CFG
    assert (cfg.scheduler, cfg.warmup_epochs, cfg.early_stop_patience) == ("none", 0, 0)
    assert (cfg.label_smoothing, cfg.augment, cfg.mixup, cfg.cutmix) == (0.0, "none", 0.0, 0.0)
    expected, reference = reference_run(data, cfg)
    trainer = new_trainer(data, cfg)
    got = [(r.train_loss, r.train_acc, r.val_loss, r.val_acc) for r in trainer.epochs()]
    assert got == expected  # exact: the same floats, not close ones
    for name, value in reference.state_dict().items():
        assert torch.equal(value, trainer.model.state_dict()[name]), name
    assert [r.lr for r in trainer.history] == [cfg.lr] * cfg.epochs
    assert trainer.scheduler is None and trainer.augment is None and "stopped_epoch" not in trainer.summary()


# --- the learning-rate schedule ------------------------------------------------------------------------


def torch_schedule(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    """The lr of each epoch's last batch, as torch's schedulers step it on a bare parameter."""
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    if cfg.scheduler == "onecycle":
        scheduler = OneCycleLR(optimizer, cfg.lr, total_steps=total, pct_start=cfg.warmup_epochs / cfg.epochs)
    else:
        scheduler = SequentialLR(
            optimizer,
            [LinearLR(optimizer, 0.01, total_iters=warmup), CosineAnnealingLR(optimizer, total - warmup)],
            [warmup],
        )
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs[steps_per_epoch - 1 :: steps_per_epoch]


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle"])
def test_lr_per_epoch_is_what_torchs_scheduler_gives(data, scheduler):
    # Batches of 16: 5 steps an epoch, enough for warmup to rise and cosine to reach ~0.
    cfg = CFG.replace(scheduler=scheduler, warmup_epochs=1, epochs=3, batch_size=16)
    trainer = new_trainer(data, cfg)
    lrs = [r.lr for r in trainer.epochs()]
    steps = len(trainer.train_loader)
    assert steps == 5
    assert lrs == pytest.approx(torch_schedule(cfg, steps), rel=1e-12)
    if scheduler == "cosine":
        # The first epoch rises from lr/100 to lr (its last batch: 0.01 + 0.99 * 4/5 of lr), then it falls to ~0.
        assert lrs[0] == pytest.approx(cfg.lr * (0.01 + 0.99 * 4 / 5))
        assert lrs[0] < cfg.lr and lrs[1] > lrs[2] and lrs[2] < 0.03 * cfg.lr
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0, abs=1e-12)  # after the last step
    else:
        # Up to lr at the end of the first epoch (pct_start 1/3), then down to lr / 25e4.
        assert lrs[0] == pytest.approx(cfg.lr) and lrs[-1] == pytest.approx(cfg.lr / 25e4)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_fused_optimizers_take_the_steps_the_schedule_sets(optimizer):
    """The first step of warmup is lr/100: the fused kernels read the lr the scheduler wrote."""

    def first_step(cfg: TrainConfig) -> float:
        torch.manual_seed(0)
        model = nn.Linear(8, 4)
        before = model.weight.detach().clone()
        opt = make_optimizer(model, cfg)
        make_scheduler(opt, cfg, steps_per_epoch=10)
        F.cross_entropy(model(torch.randn(16, 8)), torch.arange(16) % 4).backward()
        opt.step()
        return (model.weight.detach() - before).abs().max().item()

    plain = TrainConfig(optimizer=optimizer, weight_decay=0.0)
    warm = plain.replace(scheduler="cosine", warmup_epochs=1)
    assert first_step(warm) == pytest.approx(0.01 * first_step(plain), rel=0.01)  # float32 weights: 3 digits


# --- early stopping ------------------------------------------------------------------------------------


def scripted(monkeypatch, val_accs: list[float]) -> None:
    """Training steps that cost nothing and validation accuracies that follow ``val_accs``."""
    script = iter(val_accs)
    monkeypatch.setattr(engine, "train_one_epoch", lambda *a, **k: (1.0, 0.5, 1e-3))
    monkeypatch.setattr(engine, "evaluate", lambda *a, **k: Evaluation(0.5, next(script), [], []))


@pytest.mark.parametrize(
    "patience, accs, trained",
    [
        (2, [0.5, 0.7, 0.7, 0.6, 0.9, 0.9, 0.9, 0.9], 4),  # equal is not better: 2 epochs without a rise
        (3, [0.5, 0.7, 0.7, 0.6, 0.9, 0.9, 0.9, 0.9], 8),  # 0.9 at epoch 5 resets it; 3 left only at the end
        (1, [0.5, 0.4, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9], 2),
        (0, [0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], 8),  # off
    ],
)
def test_early_stopping_stops_after_patience_epochs_without_a_better_val_acc(
    data, monkeypatch, patience, accs, trained
):
    scripted(monkeypatch, accs)
    cfg = CFG.replace(epochs=8, early_stop_patience=patience)
    trainer = new_trainer(data, cfg)
    assert [r.epoch for r in trainer.epochs()] == list(range(1, trained + 1))
    summary = trainer.summary()
    assert trainer.stopped_early == (trained < cfg.epochs)
    if trained < cfg.epochs:
        assert summary["stopped_epoch"] == trained
    else:  # trained every epoch: nothing was stopped, so no stopped_epoch
        assert "stopped_epoch" not in summary
    # A Trainer restored from the state it stopped in stays stopped: a resumed run has nothing left to train.
    again = new_trainer(data, cfg)
    again.load_state_dict(trainer.state_dict())
    assert list(again.epochs()) == [] and again.summary() == summary


# --- label smoothing -----------------------------------------------------------------------------------


def test_label_smoothing_changes_the_training_loss_not_val_loss(data):
    cfg = CFG.replace(epochs=1)
    plain, smoothed = new_trainer(data, cfg), new_trainer(data, cfg.replace(label_smoothing=0.2))
    (p,), (s,) = list(plain.epochs()), list(smoothed.epochs())
    assert s.train_loss != p.train_loss and smoothed.criterion.label_smoothing == 0.2
    # val_loss is the plain cross entropy of the smoothed run's model, not the smoothed one.
    model = smoothed.model.eval()
    with torch.inference_mode():
        x, y = next(iter(DataLoader(data.val, len(data.val))))
        logits = model(x)
    assert s.val_loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert s.val_loss != pytest.approx(F.cross_entropy(logits, y, label_smoothing=0.2).item(), rel=1e-3)


# --- augmentation ----------------------------------------------------------------------------------------


def batch(n=32, size=16):
    torch.manual_seed(7)
    return torch.randn(n, 3, size, size), torch.arange(n) % 4


def test_flip_mirrors_some_images_of_a_batch_each_drawn_alone_from_its_own_seeded_stream():
    x, y = batch()
    global_state = torch.get_rng_state()
    out, target = Augment(TrainConfig(augment="flip"), 4, *normalisation(None))(x, y)
    assert torch.equal(torch.get_rng_state(), global_state)  # the global stream is left as it was
    assert target is y
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    assert all(f or torch.equal(o, i) for f, o, i in zip(flipped, out, x))
    assert 0 < sum(flipped) < len(x)  # per image: some mirrored, some not
    again, _ = Augment(TrainConfig(augment="flip"), 4, *normalisation(None))(x, y)
    assert torch.equal(again, out)  # the same seed, the same images
    other, _ = Augment(TrainConfig(augment="flip", seed=43), 4, *normalisation(None))(x, y)
    assert not torch.equal(other, out)


def test_randaugment_works_on_pixels_in_0_1_and_gives_back_normalised_images(data):
    assert normalisation(data.train) == ([data.train.mean], [data.train.std])
    assert normalisation(None) == (list(IMAGENET_MEAN), list(IMAGENET_STD))  # image folders
    x, y = next(iter(DataLoader(data.train, 32)))
    mean, std = data.train.mean, data.train.std
    pixels = x * std + mean
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6  # the un-normalised batch is in [0, 1]
    out, _ = Augment(CFG.replace(augment="randaugment"), 4, *normalisation(data.train))(x, y)
    assert out.shape == x.shape and out.dtype == x.dtype
    back = out * std + mean
    assert back.min() >= -1e-5 and back.max() <= 1 + 1e-5
    changed = sum(not torch.allclose(o, i, atol=1e-5) for o, i in zip(out, x))
    assert changed > len(x) // 2  # 2 ops per image; few of them leave a grey image as it was
    # Each image draws its own ops: 32 copies of one image come out in many ways.
    copies = x[:1].repeat(32, 1, 1, 1)
    out, _ = Augment(CFG.replace(augment="randaugment"), 4, *normalisation(data.train))(copies, y)
    assert len({o.numpy().tobytes() for o in out}) > 16


class Spy(nn.Module):
    """The model, with every batch it was given and every output it gave."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs, self.logits = model, [], []

    def forward(self, x):
        logits = self.model(x)
        self.inputs.append(x.detach().clone())
        self.logits.append(logits.detach().clone())
        return logits


def test_mixup_and_cutmix_train_on_soft_targets_and_count_accuracy_on_the_labels(data):
    cfg = CFG.replace(mixup=0.4, cutmix=1.0)
    torch.manual_seed(0)
    model = Spy(build_model("resnet", 18, 4))
    batches = list(DataLoader(data.train, 32, shuffle=True, generator=torch.Generator().manual_seed(0)))
    augment = Augment(cfg, 4, *normalisation(data.train))
    loss, acc, _ = train_one_epoch(
        model, batches, make_optimizer(model, cfg), Precision("fp32", CPU), 1, False, augment=augment
    )
    replay = Augment(cfg, 4, *normalisation(data.train))
    mixed = [replay(x, y) for x, y in batches]
    n = sum(len(y) for _, y in batches)
    for seen, (x, target), (_, y) in zip(model.inputs, mixed, batches):
        assert torch.equal(seen, x)  # what the model saw is what the seeded stream makes
        assert target.shape == (len(y), 4) and torch.allclose(target.sum(1), torch.ones(len(y)))
    assert any((t.max(1).values < 1).any() for _, t in mixed)  # soft: some images are mixed
    expected_loss = sum(F.cross_entropy(lg, t, reduction="sum").item() for lg, (_, t) in zip(model.logits, mixed))
    assert loss == pytest.approx(expected_loss / n, rel=1e-5)
    correct = sum((lg.argmax(1) == y).sum().item() for lg, (_, y) in zip(model.logits, batches))
    assert acc == correct / n and 0 <= acc <= 1  # against the images' own labels


# --- resume ------------------------------------------------------------------------------------------------


def test_state_dict_round_trip_with_every_option_continues_as_an_uninterrupted_run(data):
    cfg = CFG.replace(
        epochs=3,
        batch_size=16,
        scheduler="cosine",
        warmup_epochs=1,
        early_stop_patience=2,
        label_smoothing=0.1,
        augment="randaugment",
        mixup=0.2,
        cutmix=1.0,
    )
    uninterrupted = new_trainer(data, cfg)
    expected = list(uninterrupted.epochs())

    first = new_trainer(data, cfg)
    next(first.epochs())
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # as a checkpoint is written, and read back
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    torch.manual_seed(1234)  # whatever happens in between: the state restores the random streams
    resumed = new_trainer(data, cfg)
    resumed.load_state_dict(state)
    rest = list(resumed.epochs())

    assert [r.epoch for r in rest] == [r.epoch for r in expected[1:]]
    for got, want in zip(rest, expected[1:]):
        for key in NUMBERS:
            assert getattr(got, key) == getattr(want, key), (got.epoch, key)
    for name, value in uninterrupted.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert resumed.scheduler.state_dict() == uninterrupted.scheduler.state_dict()
    assert resumed.summary() == uninterrupted.summary()


# --- configuration and the command line ------------------------------------------------------------------


def test_recommended_params_file_is_the_study_with_a_schedule_and_label_smoothing():
    cfg = load_config(ROOT / "params" / "recommended.yaml")
    study = TrainConfig()
    for key in ("lr", "batch_size", "optimizer", "weight_decay", "seed", "split_seed", "val_ratio", "image_size"):
        assert getattr(cfg, key) == getattr(study, key), key
    assert (cfg.data, cfg.depth, cfg.precision) == ("digits", 34, study.precision)
    assert cfg.scheduler == "cosine" and 1 <= cfg.warmup_epochs <= 2 and cfg.label_smoothing == 0.1
    assert cfg.augment == "none"  # a mirrored digit is no digit
    assert cfg.epochs == study.epochs  # the same budget: differences come from the schedule and the loss


@pytest.mark.parametrize(
    "values, message",
    [
        ({"scheduler": "step"}, "config key 'scheduler' must be one of none, cosine, onecycle, got 'step'"),
        ({"warmup_epochs": 1}, "config key 'warmup_epochs' must be 0 with scheduler 'none'"),
        ({"scheduler": "cosine", "warmup_epochs": 10}, "config key 'warmup_epochs' must be >= 0 and below epochs (10)"),
        ({"scheduler": "cosine", "warmup_epochs": -1}, "config key 'warmup_epochs' must be >= 0"),
        ({"early_stop_patience": -1}, "config key 'early_stop_patience' must be >= 0 (0: off), got -1"),
        ({"label_smoothing": 1}, "config key 'label_smoothing' must be >= 0 and below 1, got 1.0"),
        ({"label_smoothing": -0.1}, "config key 'label_smoothing' must be >= 0 and below 1, got -0.1"),
        ({"augment": "rotate"}, "config key 'augment' must be one of none, flip, randaugment, got 'rotate'"),
        ({"mixup": -0.2}, "config key 'mixup' must be >= 0 and finite (0: off), got -0.2"),
        ({"cutmix": math.inf}, "config key 'cutmix' must be >= 0 and finite (0: off), got inf"),
    ],
)
def test_bad_option_values_are_one_line_naming_the_key(values, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**values)
    assert message in err.value.message and "\n" not in err.value.message


@pytest.mark.parametrize(
    "args, message",
    [
        (["--scheduler", "foo"], "Invalid value for '--scheduler'"),
        (["--augment", "mirror"], "Invalid value for '--augment'"),
        (["--warmup-epochs", "2"], "config key 'warmup_epochs' must be 0 with scheduler 'none'"),
        (["--label-smoothing", "1"], "config key 'label_smoothing' must be >= 0 and below 1"),
        (["--mixup", "-1"], "config key 'mixup' must be >= 0"),
        (["--early-stop-patience", "-2"], "config key 'early_stop_patience' must be >= 0"),
    ],
)
def test_zar_train_refuses_bad_option_values_in_one_line(store, zar, args, message):
    result = zar("train", *TINY, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert all_runs() == []  # refused before any run was started


def test_zar_train_with_the_options_records_them_and_resumes_a_run_that_stopped_early(store, zar, monkeypatch):
    """Early stopping ends the run; a crash while its results are saved leaves a checkpoint that
    a resume finishes from, training nothing more; then the run is FINISHED, nothing left to resume."""
    log_results = recording.log_results
    crashes = iter([True])

    def crash_once(*args):
        if next(crashes, False):
            raise OSError(28, "No space left on device")
        return log_results(*args)

    monkeypatch.setattr(recording, "log_results", crash_once)
    options = ["--scheduler", "cosine", "--warmup-epochs", "1", "--early-stop-patience", "1"]
    options += ["--label-smoothing", "0.1", "--mixup", "0.2"]
    failed = zar("train", "--model", "resnet", *epochs(6), *options)
    assert failed.exit_code != 0 and "No space left on device" in failed.stderr
    (run,) = runs_of()
    run_id, params = run.info.run_id, run.data.params
    assert run.info.status == "FAILED"
    assert (params["scheduler"], params["warmup_epochs"], params["early_stop_patience"]) == ("cosine", "1", "1")
    assert (params["label_smoothing"], params["mixup"], params["augment"]) == ("0.1", "0.2", "none")
    stopped = int(run.data.metrics["stopped_epoch"])
    assert 2 <= stopped < 6 and "stopped early after epoch" in failed.output

    resumed = zar("train", "--resume", run_id, "--no-progress")
    assert resumed.exit_code == 0, resumed.output
    assert f"after epoch {stopped} of 6" in resumed.output and f"epoch {stopped + 1:>3}/6" not in resumed.output
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["stopped_epoch"] == stopped
    val_acc = [m.value for m in sorted(client.get_metric_history(run_id, "val_acc"), key=lambda m: m.step)]
    assert len(val_acc) == stopped and val_acc[-1] <= max(val_acc[:-1])  # patience 1: the last did not rise
    lrs = sorted(client.get_metric_history(run_id, "lr"), key=lambda m: m.step)
    assert [m.step for m in lrs] == list(range(1, stopped + 1))
    assert lrs[0].value < 1e-3 and all(a.value > b.value for a, b in zip(lrs[1:], lrs[2:]))  # rises, then falls
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    final = next(m for m in models if m.name == "model")
    assert {m.step for m in final.metrics if not m.key.startswith("system/")} == {stopped}  # the last trained

    again = zar("train", "--resume", run_id)
    assert again.exit_code == 2 and "already FINISHED; there is nothing to resume" in again.stderr
