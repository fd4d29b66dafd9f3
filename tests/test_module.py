"""The Lightning module: the paper's one-cycle schedule, weight-decay groups, the label-smoothed loss."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from convmixer_pl.data import DigitsDataModule
from convmixer_pl.module import ConvMixerClassifier, one_cycle


@pytest.mark.parametrize(("step", "expected"), [
    (0, 0.0), (20, 0.5), (40, 1.0), (60, (1 + 1 / 20) / 2), (80, 1 / 20), (90, 1 / 40), (100, 0.0), (130, 0.0),
])
def test_one_cycle_triangle(step, expected):
    assert one_cycle(step, 100) == pytest.approx(expected)


def test_one_cycle_fractional_breakpoints():
    # 2T/5 and 4T/5 are not whole steps for T = 7: the peak and the knee sit between steps
    assert one_cycle(2 * 7 / 5, 7) == pytest.approx(1.0)
    assert one_cycle(4 * 7 / 5, 7) == pytest.approx(0.05)
    assert 0 < one_cycle(2, 7) < 1 and 0.05 < one_cycle(3, 7) < 1


def _tiny(**kwargs) -> ConvMixerClassifier:
    return ConvMixerClassifier(**{"dim": 8, "depth": 1, "kernel_size": 3, "patch_size": 2, "num_classes": 5,
                                  **kwargs})


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_one_dimensional_parameters_get_no_weight_decay(optimizer):
    module = _tiny(optimizer=optimizer, weight_decay=0.05, lr=0.3, scheduler="constant")
    opt = module.configure_optimizers()
    assert type(opt) is {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optimizer]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    grouped = {id(p) for group in opt.param_groups for p in group["params"]}
    assert grouped == {id(p) for p in module.parameters()}
    assert len(grouped) == len(decay["params"]) + len(no_decay["params"])
    names = {id(p): n for n, p in module.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {"model.head.bias", "model.stem.2.weight",
                                                          "model.blocks.0.0.fn.0.bias"}
    assert "model.head.weight" in {names[id(p)] for p in decay["params"]}
    assert all(group["lr"] == 0.3 for group in opt.param_groups)
    if optimizer == "sgd":
        assert decay["momentum"] == 0.9 and decay["nesterov"]
    else:
        assert decay["eps"] == 1e-3


class _RecordLR(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_one_cycle_is_stepped_every_batch_over_the_whole_run():
    recorder = _RecordLR()
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=5, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[recorder])
    module = _tiny(num_classes=10, in_chans=1, lr=0.02)
    trainer.fit(module, DigitsDataModule(batch_size=16, num_workers=0))
    total = 10  # 2 epochs x 5 batches; the official loop uses t = (i + 1) / T for step i
    assert recorder.lrs == pytest.approx([0.02 * one_cycle(i + 1, total) for i in range(total)])
    assert max(recorder.lrs) == pytest.approx(0.02)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_training_loss_is_label_smoothed():
    torch.manual_seed(0)
    module = _tiny(label_smoothing=0.2).eval()  # eval: BatchNorm uses fixed statistics, so logits repeat
    images, targets = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    with torch.no_grad():
        log_probs = module(images).log_softmax(dim=1)
    # (1 - e) * NLL + e * mean over classes of -log p, written out
    expected = (0.8 * -log_probs[torch.arange(6), targets] + 0.2 * -log_probs.mean(dim=1)).mean()
    with torch.no_grad():
        loss = module.training_step((images, targets), 0)
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert loss != pytest.approx(F.nll_loss(log_probs, targets).item(), rel=1e-3)


def test_flip_tta_scores_the_mean_logits_of_image_and_mirror_and_is_not_a_stored_hyperparameter():
    torch.manual_seed(0)
    module = _tiny(tta="flip").eval()
    images = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = (module(images) + module(images.flip(-1))) / 2
        torch.testing.assert_close(module.evaluation_logits(images), expected, rtol=0, atol=0)
        assert not torch.allclose(module.evaluation_logits(images), module(images))
    assert "tta" not in module.hparams  # an evaluation choice: `--model.tta` applies to any checkpoint
    with pytest.raises(ValueError, match="model.tta"):
        _tiny(tta="five-crop")
