"""`ConvMixerClassifier`: trains a `ConvMixer` with the paper's loss, optimizer and schedule."""

from __future__ import annotations

from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from .model import Activation, ConvMixer


def one_cycle(step: int, total_steps: int) -> float:
    """The paper's triangle as a factor of the peak lr: interp(t, [0, 2T/5, 4T/5, T], [0, 1, 1/20, 0])."""
    t = total_steps
    return float(np.interp(step, [0, 2 * t / 5, 4 * t / 5, t], [0.0, 1.0, 1 / 20, 0.0]))


class ConvMixerClassifier(L.LightningModule):
    """ConvMixer image classifier.

    Args:
        dim, depth, kernel_size, patch_size, act: the architecture (see `configs/model/` for the named variants).
        num_classes, in_chans, image_size: linked from the data module by the CLI.
        label_smoothing: for the cross-entropy loss.
        optimizer: "adamw" (the paper's) or "sgd" (momentum 0.9, nesterov).
        lr: peak learning rate. weight_decay: applied to conv and linear weights only, never to biases or norms.
        opt_eps: AdamW epsilon (the paper uses 1e-3).
        scheduler: "onecycle" (the paper's triangle, stepped every optimizer step), "cosine" or "constant".
    """

    def __init__(
        self,
        dim: int = 256,
        depth: int = 8,
        kernel_size: int = 5,
        patch_size: int = 2,
        act: Activation = "gelu",
        num_classes: int = 10,
        in_chans: int = 3,
        image_size: int | None = None,
        label_smoothing: float = 0.1,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 0.01,
        weight_decay: float = 0.01,
        opt_eps: float = 1e-3,
        scheduler: Literal["onecycle", "cosine", "constant"] = "onecycle",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = ConvMixer(dim, depth, kernel_size, patch_size, in_chans, num_classes, act, image_size)
        top_k = min(5, num_classes)
        self.train_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.metrics = torch.nn.ModuleDict({
            f"{stage}_{name}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
            for stage in ("val", "test") for name, k in (("acc1", 1), ("acc5", top_k))
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        hard = targets.argmax(1) if targets.ndim == 2 else targets  # soft targets come from mixup/cutmix
        self.train_acc1(logits, hard)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log("train/acc1", self.train_acc1, on_step=False, on_epoch=True)
        return loss

    def _evaluate(self, batch, stage: str) -> None:
        images, targets = batch
        logits = self(images)
        loss = F.cross_entropy(logits, targets)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True)
        for k in ("acc1", "acc5"):
            metric = self.metrics[f"{stage}_{k}"]
            metric(logits, targets)
            self.log(f"{stage}/{k}", metric, prog_bar=k == "acc1")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(images).softmax(dim=1)

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 else decay).append(param)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, eps=hp.opt_eps)
        else:
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=0.9, nesterov=True)
        if hp.scheduler == "constant":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if hp.scheduler == "onecycle":
            # the factor for the step about to be taken: t = (i + 1) / T as in the official loop, so step 0 learns
            factor = lambda step: one_cycle(step + 1, total)  # noqa: E731
        else:
            factor = lambda step: 0.5 * (1 + np.cos(np.pi * min(step, total) / total))  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
