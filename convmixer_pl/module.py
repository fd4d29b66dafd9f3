"""`ConvMixerClassifier`: trains a `ConvMixer` with the paper's loss, metrics, optimizer and schedule, and carries
the evaluation preprocessing and class names with its weights."""

from __future__ import annotations

import inspect
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import FSDPStrategy
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from .callbacks.resume import mid_epoch, per_process
from .data.augment import eval_transform
from .model import ConvMixer
from .weights import load_pretrained


def one_cycle(step: int, total_steps: int) -> float:
    """The paper's triangle as a factor of the peak lr: interp(t, [0, 2T/5, 4T/5, T], [0, 1, 1/20, 0])."""
    t = total_steps
    return float(np.interp(step, [0, 2 * t / 5, 4 * t / 5, t], [0.0, 1.0, 1 / 20, 0.0]))


def use_channels_last(setting: bool | None, device: torch.device, kernel_size: int) -> bool:
    """`setting`, or where it is None the measured choice: channels-last helps on the CPU and for kernels up to
    7 on GPUs, and slows kernel-9 models down on GPUs (docs/benchmarks.md)."""
    if setting is not None:
        return setting
    if device.type == "cpu":
        return True
    return device.type == "cuda" and kernel_size <= 7


class ConvMixerClassifier(L.LightningModule):
    """ConvMixer image classifier.

    The architecture is `ConvMixer`'s arguments (`dim`, `depth`, `kernel_size`, `patch_size`, `act`, `in_chans`,
    `num_classes`, `image_size`, `grad_checkpointing`, `fast_depthwise_grad`), passed through as they are.

    Args:
        label_smoothing: Label smoothing of the cross-entropy loss.
        optimizer: adamw (the paper's) or sgd (momentum 0.9, Nesterov).
        lr: Peak learning rate.
        weight_decay: Applied to conv and linear weights only, never to biases or norms.
        opt_eps: AdamW epsilon (the paper uses 1e-3).
        scheduler: onecycle (the paper's triangle, stepped every optimizer step), cosine or constant.
        pretrained: Weights file to start from: an official release (.pth.tar), a timm file (.pth/.safetensors)
            or a checkpoint of ours; the layout is detected. A head for another class count is re-initialised.
        channels_last: Run in the channels-last memory format. None (default) decides by measurement: on for the
            CPU and for kernel_size <= 7 on GPUs, off for kernel_size 9 on GPUs (see docs/benchmarks.md).
        compile: Compile the network with `torch.compile` when the trainer starts (the weights' names stay).
        compile_mode: The `torch.compile` mode.
        class_names: Class names, in label order.
        mean: Per-channel normalisation mean of the input images.
        std: Per-channel normalisation std of the input images.
        crop_pct: Evaluation resize: the short side goes to image_size / crop_pct, then a center crop.
        interpolation: Evaluation resize interpolation.
            The CLI links these five (and in_chans, num_classes, image_size) from the data module; every
            checkpoint stores them, so `predict`, `serve` and exports preprocess new images as in training.
        tta: Test-time augmentation of validate, test and predict (timm's `--tta`): `flip` scores each image by
            the mean logits of the image and its mirror. An evaluation choice, not part of the trained model: it
            is not stored in checkpoints, so `--model.tta flip` applies to any checkpoint.
    """

    def __init__(
        self,
        label_smoothing: float = 0.1,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 0.01,
        weight_decay: float = 0.01,
        opt_eps: float = 1e-3,
        scheduler: Literal["onecycle", "cosine", "constant"] = "onecycle",
        pretrained: str | None = None,
        channels_last: bool | None = None,
        compile: bool = False,
        compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default",
        class_names: list[str] | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        crop_pct: float | None = None,
        interpolation: str | None = None,
        tta: Literal["none", "flip"] = "none",
        **model_args: Any,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tta"])
        if tta not in ("none", "flip"):
            raise ValueError(f"model.tta must be 'none' or 'flip', got {tta!r}")
        self.tta = tta
        self.model = ConvMixer(**model_args)
        # the whole architecture, ConvMixer's defaults included, so every checkpoint states it
        arch = inspect.signature(ConvMixer).bind(**model_args)
        arch.apply_defaults()
        self.hparams.update(arch.arguments)
        self._channels_last = self._compiled = False  # applied in setup(), once the device is known
        if pretrained:
            load_pretrained(self.model, pretrained)
        num_classes = self.model.num_classes
        top_k = min(5, num_classes)
        self.train_loss = MeanMetric()
        self.train_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.metrics = torch.nn.ModuleDict({
            f"{stage}_{name}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
            for stage in ("val", "test") for name, k in (("acc1", 1), ("acc5", top_k))
        })
        # per-sample mean loss, exact across DDP ranks holding different sample counts (Lightning's sync_dist
        # averages the sample count as an integer and rounds it)
        self.eval_loss = torch.nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})

    # -- what the weights were trained on -------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def class_names(self) -> list[str]:
        names = self.hparams.get("class_names")
        return list(names) if names else [str(i) for i in range(self.num_classes)]

    @property
    def data_config(self) -> dict[str, Any]:
        """The evaluation preprocessing, in timm's `pretrained_cfg` terms (input_size as (C, H, W))."""
        hp, size = self.hparams, self.hparams.get("image_size")
        return {"input_size": (self.model.in_chans, size, size), "mean": hp.get("mean"), "std": hp.get("std"),
                "crop_pct": hp.get("crop_pct") or 1.0, "interpolation": hp.get("interpolation") or "bilinear"}

    def eval_transform(self):
        """Resize (shorter side), centre-crop and normalise an image as the training data module evaluated."""
        config = self.data_config
        missing = [key for key, value in (("image_size", config["input_size"][1]), ("mean", config["mean"]),
                                          ("std", config["std"])) if value is None]
        if missing:
            raise ValueError(f"the model has no {', '.join(missing)} (a checkpoint written before they were "
                             "stored, or a model built without a data module); train it with `convmixer fit`")
        return eval_transform(config["input_size"][1], tuple(config["mean"]), tuple(config["std"]),
                              float(config["crop_pct"]), config["interpolation"])

    # -- set-up ----------------------------------------------------------------------------------------------------
    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        kwargs.setdefault("pretrained", None)  # the checkpoint holds the weights: don't read model.pretrained again
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device
        if use_channels_last(self.hparams.channels_last, device, self.hparams.kernel_size) and not self._channels_last:
            self.model.to(memory_format=torch.channels_last)
            self._channels_last = True
        if self.hparams.compile and not self._compiled:
            self.model.compile(mode=self.hparams.compile_mode)  # in place: state_dict keys are unchanged
            self._compiled = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # every process's running sums of this epoch's training metrics, so that an epoch resumed part-way
        # reports the same means; not in the state_dict, which holds rank 0's alone
        if not self._trainer or self.trainer.state.fn != "fit" or not mid_epoch(self.trainer):
            return
        checkpoint["train_metric_states"] = per_process(
            {name: {k: v.detach().cpu().clone() for k, v in metric.metric_state.items()}
             for name, metric in (("train_loss", self.train_loss), ("train_acc1", self.train_acc1))})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("train_metric_states")
        if not states or len(states) != (self.trainer.world_size if self._trainer else 1):
            return
        own = states[self.trainer.global_rank if self._trainer else 0]
        for name, metric in (("train_loss", self.train_loss), ("train_acc1", self.train_acc1)):
            metric.load_state_dict(own.get(name, {}), strict=False)  # torchmetrics sets the states it finds

    # -- steps -----------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        hard = targets.argmax(1) if targets.ndim == 2 else targets  # soft targets come from mixup/cutmix
        self.train_acc1(logits, hard)
        self.train_loss.update(loss.detach(), weight=targets.shape[0])
        self.log("train/loss_step", loss, prog_bar=True, sync_dist=True)  # all ranks' mean
        self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True)
        self.log("train/acc1", self.train_acc1, on_step=False, on_epoch=True)
        return loss

    def evaluation_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The logits validate, test and predict score images by: with `tta: flip`, those of the image and its
        mirror, averaged."""
        logits = self(images)
        return (logits + self(images.flip(-1))) / 2 if self.tta == "flip" else logits

    def _evaluate(self, batch, stage: str) -> torch.Tensor:
        images, targets = batch
        logits = self.evaluation_logits(images)
        loss = F.cross_entropy(logits, targets)
        self.eval_loss[stage].update(loss, weight=targets.shape[0])
        self.log(f"{stage}/loss", self.eval_loss[stage], prog_bar=stage == "val")
        for k in ("acc1", "acc5"):
            metric = self.metrics[f"{stage}_{k}"]
            metric(logits, targets)
            self.log(f"{stage}/{k}", metric, prog_bar=k == "acc1")
        return logits

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test")  # the logits: callbacks.PerClassReport counts them per class

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.evaluation_logits(images).softmax(dim=1)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        strategy = self.trainer.strategy
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and isinstance(strategy, FSDPStrategy):
            # Lightning refuses norm clipping under FSDP; the root FSDP module computes the norm over all shards
            strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for module in self.modules():
            # chosen by layer, not by param.ndim: under FSDP every parameter is a flat 1-D shard
            weighted = isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))
            for name, param in module.named_parameters(recurse=False):
                if param.requires_grad:
                    (decay if weighted and name == "weight" else no_decay).append(param)
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
