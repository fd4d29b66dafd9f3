"""Predict with a trained checkpoint: every image under a folder, preprocessed as the checkpoint was trained, and a
writer that puts the top-k classes of each sample in one ordered CSV (and JSON) file, also under DDP.

`convmixer predict --ckpt_path X --data <folder>` works because `folder_data_args` turns an existing folder given
to `--data` into `--data convmixer_pl.predict.FolderPredictDataModule --data.root <folder>`.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from .data import DataError, ImageDataModule, read_image
from .reliability import CheckpointError, read_checkpoint
from .transforms import eval_transform

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def read_hparams(ckpt_path: str | os.PathLike) -> dict:
    """The hyper-parameters stored in a checkpoint written by `convmixer fit`, without loading its weights."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise DataError(f"checkpoint {path}: no such file; pass a .ckpt written by `convmixer fit`")
    try:
        state = read_checkpoint(path)
    except CheckpointError as err:  # a truncated file, another format, a bare state dict...
        reason = err.__cause__ or "no state_dict entry"
        raise DataError(f"{path} is not a checkpoint written by `convmixer fit` ({type(reason).__name__}: "
                        f"{str(reason).splitlines()[0] if str(reason) else ''})") from err
    hparams = state.get("hyper_parameters")
    if not hparams:
        raise DataError(f"{path} holds no hyper-parameters; pass a .ckpt written by `convmixer fit`")
    return dict(hparams)


def class_names_of(hparams: dict) -> list[str]:
    names = hparams.get("class_names")
    return list(names) if names else [str(i) for i in range(hparams["num_classes"])]


def predict_transform(hparams: dict, ckpt_path: str | os.PathLike = "checkpoint"):
    """Resize (shorter side), centre-crop and normalise as the checkpoint's data module did for evaluation."""
    missing = [key for key in ("image_size", "mean", "std") if hparams.get(key) is None]
    if missing:
        raise DataError(f"{ckpt_path} has no {', '.join(missing)} hyper-parameter(s) (written before they were "
                        "stored); train it again with this version of `convmixer fit`")
    return eval_transform(int(hparams["image_size"]), tuple(hparams["mean"]), tuple(hparams["std"]),
                          float(hparams.get("crop_pct") or 1.0), hparams.get("interpolation") or "bilinear")


def find_images(root: Path) -> list[Path]:
    """Image files anywhere under `root`, sorted; hidden files (such as macOS `._name.jpg`) are skipped."""
    return sorted(path for path in root.rglob("*")
                  if path.suffix.lower() in IMG_EXTENSIONS and not path.name.startswith(".") and path.is_file())


class ImageFiles(Dataset):
    """Image files of any size and PIL mode, converted to the model's channels; items are (image, index)."""

    def __init__(self, paths: list[Path], in_chans: int, transform) -> None:
        if in_chans not in _MODES:
            raise DataError(f"cannot feed images to a model with in_chans={in_chans}; supported: {sorted(_MODES)}")
        self.paths, self.mode, self.transform = paths, _MODES[in_chans], transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.transform(read_image(self.paths[index], self.mode)), index


class FolderPredictDataModule(ImageDataModule):
    """Every image under `root` (nested folders, any size or mode), for `convmixer predict` only.

    Image size, channels, normalisation and class names come from the checkpoint, so no training data is needed.
    The CLI fills `ckpt_path` with the checkpoint being predicted with.
    """

    def __init__(
        self,
        root: str,
        ckpt_path: str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=persistent_workers)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data.root {self.root}: no such folder of images to predict")
        if ckpt_path is None:
            raise DataError("data.ckpt_path is needed: image size, channels and normalisation come from the "
                            "checkpoint (convmixer predict fills it from --ckpt_path)")
        hp = read_hparams(ckpt_path)
        self.num_classes, self.in_chans, self.image_size = hp["num_classes"], hp["in_chans"], hp["image_size"]
        self.class_names = class_names_of(hp)
        self.transform = predict_transform(hp, ckpt_path)
        self.predict_set: ImageFiles | None = None

    def setup(self, stage: str | None = None) -> None:
        if stage != "predict":
            raise DataError(f"FolderPredictDataModule only predicts (got stage {stage!r}); train and test with a "
                            "labelled data module such as ImageFolderDataModule")
        if self.predict_set is None:
            paths = find_images(self.root)
            if not paths:
                raise DataError(f"{self.root} holds no images (looked for {', '.join(IMG_EXTENSIONS)} in it and "
                                "its sub-folders)")
            self.predict_set = ImageFiles(paths, self.in_chans, self.transform)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set)


def folder_data_args(argv: list[str]) -> list[str]:
    """For `predict`, rewrite `--data <existing folder>` (or `--data=<folder>`) into the folder data module.

    jsonargparse reads a `--data` value as a class name or a config file; a folder is neither. Config files,
    class names, JSON and `--data.*` keys are left as they are.
    """
    if next((arg for arg in argv if arg in ("fit", "validate", "test", "predict")), None) != "predict":
        return argv
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        value, width = None, 1
        if arg == "--data" and i + 1 < len(argv):
            value, width = argv[i + 1], 2
        elif arg.startswith("--data="):
            value = arg[len("--data="):]
        if value is not None and Path(value).is_dir():
            out += ["--data", f"{FolderPredictDataModule.__module__}.{FolderPredictDataModule.__name__}",
                    "--data.root", value]
        elif value is not None and os.sep in value and not value.lstrip().startswith("{") and not Path(value).exists():
            raise DataError(f"--data {value}: no such folder of images (or config file)")
        else:
            out += argv[i:i + width]
        i += width
    return out


class PredictionWriter(BasePredictionWriter):
    """Writes the top-k classes and probabilities of every predicted sample, in sample order, to one CSV file.

    Under DDP every rank sends its top-k to the others and rank 0 writes the whole, ordered file once.

    Args:
        output: CSV file; default `<trainer.default_root_dir>/predictions.csv` (checkpoints/<name>/).
        top_k: how many classes per sample.
        json: also write the same predictions as JSON next to the CSV (same name, .json).
    """

    def __init__(self, output: str | None = None, top_k: int = 5, json: bool = False) -> None:
        super().__init__(write_interval="epoch")
        if top_k < 1:
            raise DataError(f"predictions.top_k must be at least 1, got {top_k}")
        self.output, self.top_k, self.json = output, top_k, json
        self.written: Path | None = None

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        if trainer.predict_loop.num_dataloaders > 1:
            predictions, batch_indices = predictions[0], batch_indices[:1]  # the data modules here have one
        probs = torch.cat([p.float() for p in predictions]) if predictions else torch.empty(0, 1)  # on the CPU
        indices = [i for batch in (batch_indices[0] if batch_indices else []) for i in batch]
        if len(indices) != len(probs):  # a loader without Lightning's index tracking: only one process runs it
            indices = list(range(len(probs)))
        values, classes = probs.topk(min(self.top_k, probs.shape[1]), dim=1)
        local = (np.asarray(indices, dtype=np.int64), values.numpy(), classes.numpy())
        parts = [local]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, local)
        if trainer.is_global_zero:
            dataset = trainer.predict_dataloaders.dataset if isinstance(trainer.predict_dataloaders, DataLoader) \
                else trainer.predict_dataloaders[0].dataset
            self.written = self._write(trainer, pl_module, dataset, parts)
        trainer.strategy.barrier()

    def _write(self, trainer, pl_module, dataset, parts) -> Path:
        names = class_names_of(dict(pl_module.hparams))
        rows: dict[int, tuple] = {}
        for indices, values, classes in parts:
            for index, value, cls in zip(indices.tolist(), values.tolist(), classes.tolist(), strict=True):
                rows[index] = (value, cls)  # a sampler that pads with repeats gives the same row twice
        paths = getattr(dataset, "paths", None) or [path for path, _ in getattr(dataset, "samples", [])] or None
        targets = getattr(dataset, "targets", None)
        k = min(self.top_k, len(names))
        fixed = ["index"] + (["path"] if paths else []) + (["target"] if targets is not None else [])
        header = fixed + [f"{field}{j}" for j in range(1, k + 1) for field in ("class", "prob")]
        records = []
        for index in sorted(rows):
            value, cls = rows[index]
            record = {"index": index}
            if paths:
                record["path"] = str(paths[index])
            if targets is not None:
                record["target"] = names[int(targets[index])]
            record["top_k"] = [{"class": names[c], "prob": round(float(p), 6)}
                               for p, c in zip(value, cls, strict=True)]
            records.append(record)
        output = Path(self.output) if self.output else Path(trainer.default_root_dir) / "predictions.csv"
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for record in records:
                writer.writerow([record[key] for key in fixed]
                                + [x for top in record["top_k"] for x in (top["class"], f"{top['prob']:.6f}")])
        print(f"convmixer: {len(records)} predictions written to {output}", file=sys.stderr)
        if self.json:
            json_path = output.with_suffix(".json")
            json_path.write_text(json.dumps(records, indent=1) + "\n")
            print(f"convmixer: and to {json_path}", file=sys.stderr)
        return output
