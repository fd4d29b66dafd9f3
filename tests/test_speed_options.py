"""Speed and memory options of ConvMixerClassifier: channels_last, torch.compile, gradient checkpointing; and the
throughput that `convmixer fit` logs."""

from __future__ import annotations

import csv

import lightning as L
import torch
import torch.nn.functional as F
from conftest import CONFIGS
from torch.utils.data import DataLoader, TensorDataset

from convmixer_pl.cli import ConvMixerCLI
from convmixer_pl.module import ConvMixerClassifier, use_channels_last

TINY = dict(dim=16, depth=3, kernel_size=5, patch_size=2, num_classes=10, image_size=16)


def _trainer() -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


def _loader(x: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(x), batch_size=2)


def test_grad_checkpointing_gives_the_same_gradients_and_norm_statistics():
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    runs = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        module = ConvMixerClassifier(**TINY, grad_checkpointing=ckpt).train()
        assert module.model.grad_checkpointing is ckpt
        F.cross_entropy(module(x), y, label_smoothing=0.1).backward()
        runs.append(module)
    plain, ckpt = runs
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=0, rtol=0, msg=name)
    # the recomputation in the backward pass must not update BatchNorm's running statistics a second time
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_channels_last_default_is_the_measured_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_channels_last(None, cpu, 9) and use_channels_last(None, cpu, 5)
    assert use_channels_last(None, cuda, 7) and not use_channels_last(None, cuda, 9)
    assert not use_channels_last(False, cpu, 5) and use_channels_last(True, cuda, 9)


def test_channels_last_applies_on_setup_and_keeps_outputs():
    torch.manual_seed(0)
    module = ConvMixerClassifier(**TINY).eval()
    x = torch.randn(4, 3, 16, 16)
    before = module(x)
    _trainer().predict(module, _loader(x), return_predictions=False)  # setup() runs inside, on the CPU
    weight = module.model.stem[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    module.eval()
    torch.testing.assert_close(module(x), before, atol=1e-5, rtol=1e-5)
    assert list(module.state_dict()) == list(ConvMixerClassifier(**TINY).state_dict())

    off = ConvMixerClassifier(**TINY, channels_last=False)
    _trainer().predict(off, _loader(x), return_predictions=False)
    assert off.model.stem[0].weight.is_contiguous()


def test_compile_wraps_the_network_in_place():
    module = ConvMixerClassifier(**TINY, compile=True, compile_mode="reduce-overhead", channels_last=False)
    keys = list(module.state_dict())
    module.trainer = _trainer()  # setup() reads the device from the trainer's strategy
    module.setup("fit")
    module.setup("fit")  # idempotent: once only
    assert module.model._compiled_call_impl is not None  # nn.Module.compile: forward goes through torch.compile
    assert list(module.state_dict()) == keys  # checkpoints keep the uncompiled names


def test_cli_accepts_speed_options(tmp_path):
    cli = ConvMixerCLI(args=["--config", str(CONFIGS / "digits.yaml"), "--model.channels_last", "false",
                             "--model.compile", "true", "--model.compile_mode", "max-autotune",
                             "--model.grad_checkpointing", "true",
                             "--trainer.benchmark", "true", "--trainer.precision", "bf16-mixed",
                             "--checkpoint.dirpath", str(tmp_path),
                             "--trainer.default_root_dir", str(tmp_path)], run=False)
    hp = cli.model.hparams
    assert (hp.channels_last, hp.compile, hp.compile_mode, hp.grad_checkpointing) == (False, True, "max-autotune",
                                                                                       True)
    assert cli.model.model.grad_checkpointing
    assert any(type(cb).__name__ == "ThroughputCallback" for cb in cli.trainer.callbacks)


def test_fit_logs_images_per_second(digits_run):
    with open(digits_run / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("train/images_per_sec")]
    assert len(rows) == 2  # one per epoch of the 2-epoch fit
    assert all(float(row["train/images_per_sec"]) > 0 for row in rows)


def test_fit_takes_the_measured_speed_choice_where_the_config_leaves_it_unset(monkeypatch, tmp_path):
    """`convmixer fit` asks `convmixer_pl.speed` for what the config leaves unset, passes what it sets as given,
    and trains with the answer: the Trainer's precision, the model's memory format and depthwise path."""
    import convmixer_pl.cli as cli
    from convmixer_pl.speed import SpeedChoice

    asked = []

    def choose(shape, device, **given):
        asked.append((shape, device.type, given))
        return SpeedChoice("32-true", channels_last=False, fast_depthwise_grad=False)

    monkeypatch.setattr(cli, "choose_speed", choose)
    monkeypatch.delenv("CONVMIXER_SPEED", raising=False)  # measured, as outside the tests
    run = ["fit", "--config", str(CONFIGS / "digits.yaml"), "--model.dim", "8", "--model.depth", "1",
           "--data.image_size", "8", "--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false",
           "--plots.enabled", "false"]
    fit = ConvMixerCLI(args=[*run, "--checkpoint.dirpath", str(tmp_path / "a")])
    shape, device, given = asked[0]
    assert (shape.dim, shape.depth, shape.image_size, shape.batch_size, device) == (8, 1, 8, 64, "cpu")
    assert given == {"precision": None, "channels_last": None, "fast_depthwise_grad": None, "compile": False,
                     "measure_now": True}
    assert fit.trainer.precision == "32-true" and fit.model.hparams.channels_last is False
    assert not any(getattr(layer, "fast_cpu_grad", False) for layer in fit.model.modules())

    given = ConvMixerCLI(args=[*run, "--checkpoint.dirpath", str(tmp_path / "b"), "--trainer.precision", "32-true",
                               "--model.channels_last", "true", "--model.fast_depthwise_grad", "true"])
    assert len(asked) == 1  # everything set: nothing to measure
    assert given.trainer.precision == "32-true" and given.model.hparams.channels_last is True
    assert all(layer.fast_cpu_grad for layer in given.model.modules() if hasattr(layer, "fast_cpu_grad"))
