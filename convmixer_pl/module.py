"""`ConvMixerClassifier`: trains a `ConvMixer` with the paper's loss, metrics, optimizer and schedule, and carries
the evaluation preprocessing and class names with its weights."""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import FSDPStrategy
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from .console import say
from .model import VARIANTS, Activation, ConvMixer
from .preprocessing import DataConfig
from .resume import load_metric_states, save_metric_states
from .weights import load_pretrained


def one_cycle(step: int, total_steps: int) -> float:
    """The paper's triangle as a factor of the peak lr: interp(t, [0, 2T/5, 4T/5, T], [0, 1, 1/20, 0])."""
    t = total_steps
    return float(np.interp(step, [0, 2 * t / 5, 4 * t / 5, t], [0.0, 1.0, 1 / 20, 0.0]))


def lr_factor(scheduler: str, step: int, total: int) -> float:
    """The learning rate of optimizer step `step` (from 0) of `total`, as a factor of the peak."""
    if scheduler == "onecycle":  # t = (i + 1) / T as in the official loop, so step 0 learns
        return one_cycle(step + 1, total)
    return float(0.5 * (1 + np.cos(np.pi * min(step, total) / total)))  # cosine


def architecture(variant: str | None, given: dict[str, Any], config: DataConfig | None) -> dict[str, Any]:
    """ConvMixer's arguments: the variant's, overridden by those `given` (None: not given), with the classes,
    channels and image size of `config`."""
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"model.variant {variant!r} is not a ConvMixer variant; choose one of {sorted(VARIANTS)}")
    arch = {**(VARIANTS[variant] if variant else {}), **{k: v for k, v in given.items() if v is not None}}
    if "dim" not in arch or "depth" not in arch:
        raise ValueError(f"the model needs model.dim and model.depth, or model.variant (one of {sorted(VARIANTS)})")
    if config is not None:
        for key, value in (("num_classes", config.num_classes), ("in_chans", config.in_chans),
                           ("image_size", config.image_size)):
            if given.get(key) not in (None, value):
                raise ValueError(f"model.{key} {given[key]} differs from the data's {value}; leave model.{key} "
                                 "unset (it comes from the data)")
            arch[key] = value
    return arch


def use_channels_last(setting: bool | None, device: torch.device, kernel_size: int) -> bool:
    """`setting`, or where it is None the measured choice: channels-last helps on the CPU and for kernels up to
    7 on GPUs, and slows kernel-9 models down on GPUs (docs/benchmarks.md)."""
    return setting if setting is not None else (device.type == "cpu" or (device.type == "cuda" and kernel_size <= 7))


class ConvMixerClassifier(L.LightningModule):
    """ConvMixer image classifier.

    The architecture is a named `variant` (`convmixer_pl.model.VARIANTS`) and/or ConvMixer's arguments: each one
    given overrides the variant's, unset ones take ConvMixer's defaults, and the classes, input channels and image
    size come from `data_config` when there is one.

    Args:
        variant: A named architecture: convmixer_1536_20, convmixer_768_32, convmixer_1024_20_ks9_p14 (the paper's
            ImageNet models) or convmixer_256_8 (the CIFAR-10 script's).
        dim: Channels of every layer (the "h" of ConvMixer-h/d).
        depth: Number of mixing blocks (the "d").
        kernel_size: Depthwise kernel size (odd); ConvMixer's default 9.
        patch_size: Patch-embedding stride and kernel size; ConvMixer's default 7.
        act: Activation, gelu (default), relu or silu.
        in_chans: Input channels (without a data config; else its).
        num_classes: Classes (without a data config; else its).
        image_size: Input size, checked against patch_size (without a data config; else its).
        grad_checkpointing: Recompute each block's activations in the backward pass instead of storing them.
        fast_depthwise_grad: On the CPU, the depthwise weight gradient from `convmixer_pl.depthwise`'s kernels;
            None (default): on, or as `convmixer fit` measures it on this machine (`convmixer_pl.speed`).
        data_config: The evaluation preprocessing and class names (`convmixer_pl.preprocessing.DataConfig`); the
            CLI links it from the data module, every checkpoint stores it, so `predict`, `serve` and exports
            preprocess new images as in training.
        label_smoothing: Label smoothing of the cross-entropy loss.
        optimizer: adamw (the paper's) or sgd (momentum 0.9, Nesterov).
        lr: Peak learning rate.
        weight_decay: Applied to conv and linear weights only, never to biases or norms.
        opt_eps: AdamW epsilon (the paper uses 1e-3).
        scheduler: onecycle (the paper's triangle, stepped every optimizer step), cosine or constant.
        pretrained: Weights file to start from: an official release (.pth.tar), a timm file (.pth/.safetensors)
            or a checkpoint of ours; the layout is detected. A head for another class count is re-initialised.
        channels_last: Run in the channels-last memory format. None (default): as `convmixer fit` measures it on this
            machine (`convmixer_pl.speed`), else on for the CPU and for kernel_size <= 7 on GPUs.
        compile: Compile the network with `torch.compile` when the trainer starts (the weights' names stay).
        compile_mode: The `torch.compile` mode.
        tta: Test-time augmentation of validate, test and predict (timm's `--tta`): `flip` scores each image by
            the mean logits of the image and its mirror. An evaluation choice, not part of the trained model: it
            is not stored in checkpoints, so `--model.tta flip` applies to any checkpoint.
    """

    def __init__(
        self,
        variant: str | None = None,
        dim: int | None = None,
        depth: int | None = None,
        kernel_size: int | None = None,
        patch_size: int | None = None,
        act: Activation | None = None,
        in_chans: int | None = None,
        num_classes: int | None = None,
        image_size: int | None = None,
        grad_checkpointing: bool = False,
        fast_depthwise_grad: bool | None = None,
        data_config: DataConfig | None = None,
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
        tta: Literal["none", "flip"] = "none",
    ) -> None:
        super().__init__()
        if tta not in ("none", "flip"):
            raise ValueError(f"model.tta must be 'none' or 'flip', got {tta!r}")
        config = DataConfig.from_dict(data_config)
        self.save_hyperparameters(ignore=["tta"])
        self.hparams["data_config"] = config.as_dict() if config else None  # checkpoints hold plain values
        self.tta = tta
        convmixer = inspect.signature(ConvMixer)  # ConvMixer's arguments are ours of the same names
        arch = architecture(variant, {k: v for k, v in locals().items() if k in convmixer.parameters}, config)
        self.model = ConvMixer(**arch)
        # the whole architecture, ConvMixer's defaults included, so every checkpoint states it
        self.hparams.update({**{name: p.default for name, p in convmixer.parameters.items()}, **arch})
        self.hparams["fast_depthwise_grad"] = fast_depthwise_grad  # None: a speed choice, not the architecture
        self._channels_last = self._compiled = False  # applied in setup(), once the device is known
        self._schedule: tuple[int, int] | None = None  # (steps of the lr schedule, the step it was saved at)
        self._speed: dict | None = None  # the speed choices this run trains with (use_speed)
        if config is not None:  # the model summary's input and output sizes and FLOPs
            self.example_input_array = torch.zeros(1, *config.input_size)
        if pretrained:
            load_pretrained(self.model, pretrained)
        num_classes = self.model.num_classes
        self.train_loss = MeanMetric()
        self.train_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.metrics = torch.nn.ModuleDict({
            f"{stage}_{name}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
            for stage in ("val", "test") for name, k in (("acc1", 1), ("acc5", min(5, num_classes)))
        })
        # per-sample mean loss, exact across DDP ranks holding different sample counts (Lightning's sync_dist
        # averages the sample count as an integer and rounds it)
        self.eval_loss = torch.nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})

    # -- what the weights were trained on -------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def data_config(self) -> DataConfig | None:
        """The evaluation preprocessing and class names the weights were trained with (None for released weights
        loaded without a data module)."""
        return DataConfig.from_dict(self.hparams.get("data_config"))

    @property
    def class_names(self) -> list[str]:
        config = self.data_config
        return list(config.class_names) if config else [str(i) for i in range(self.num_classes)]

    def eval_transform(self):
        """Resize (shorter side), centre-crop and normalise an image as the training data module evaluated."""
        if (config := self.data_config) is None:
            raise ValueError("the model has no data_config (a checkpoint written before it was stored, or a model "
                             "built without a data module); train it with `convmixer fit`")
        return config.eval_transform()

    # -- set-up ----------------------------------------------------------------------------------------------------
    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        kwargs.setdefault("pretrained", None)  # the checkpoint holds the weights: don't read model.pretrained again
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def use_speed(self, channels_last: bool, fast_depthwise_grad: bool, precision: str) -> None:
        """Take the speed choices measured for this machine (`convmixer_pl.speed`) where none was given; checkpoints
        keep them, so a resumed run trains as the run it continues."""
        self._speed = {"precision": precision, "channels_last": channels_last,
                       "fast_depthwise_grad": fast_depthwise_grad, "threads": torch.get_num_threads()}
        if self.hparams.channels_last is None:
            self.hparams.channels_last = channels_last
        if self.hparams.fast_depthwise_grad is None:
            for layer in self.model.modules():
                if hasattr(layer, "fast_cpu_grad"):
                    layer.fast_cpu_grad = fast_depthwise_grad

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device
        if use_channels_last(self.hparams.channels_last, device, self.hparams.kernel_size) and not self._channels_last:
            self.model.to(memory_format=torch.channels_last)
            self._channels_last = True
        if self.hparams.compile and not self._compiled:
            self.model.compile(mode=self.hparams.compile_mode)  # in place: state_dict keys are unchanged
            self._compiled = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_metric_states(checkpoint, self._trainer, {"train_loss": self.train_loss, "train_acc1": self.train_acc1})
        if self._schedule is not None:
            checkpoint["schedule_steps"] = self._schedule[0]
        if self._speed is not None:
            checkpoint["speed"] = self._speed

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        load_metric_states(checkpoint, self._trainer, {"train_loss": self.train_loss, "train_acc1": self.train_acc1})
        if "schedule_steps" in checkpoint:  # compared with the resumed run's in configure_optimizers
            self._schedule = (checkpoint["schedule_steps"], checkpoint.get("global_step", 0))

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
        else:
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
        optimizer = (torch.optim.AdamW(groups, lr=hp.lr, eps=hp.opt_eps) if hp.optimizer == "adamw"
                     else torch.optim.SGD(groups, lr=hp.lr, momentum=0.9, nesterov=True))
        if hp.scheduler == "constant":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if self._schedule is not None and self._schedule[0] != total:  # a longer (or shorter) run resumed
            was, step = self._schedule
            say(f"the {hp.scheduler} schedule now spans {total} steps (was {was}): at the resumed step {step} the "
                f"learning rate goes from {hp.lr * lr_factor(hp.scheduler, step, was):.3g} to "
                f"{hp.lr * lr_factor(hp.scheduler, step, total):.3g}")
        self._schedule = (total, 0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, hp.scheduler, total=total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
