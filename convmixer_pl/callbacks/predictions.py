"""`convmixer predict` output: the top-k classes and probabilities of every sample, in sample order, in one CSV
(and JSON) file, also under DDP; `top_classes`, the records it writes, which `convmixer serve` answers with too."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from ..console import say
from ..files import atomic_write
from ..resume import per_process


def top_classes(probs: torch.Tensor, names: list[str], k: int) -> list[list[dict]]:
    """Each row's `k` most probable classes, most probable first: [{"class": name, "prob": rounded to 6 places}]."""
    values, classes = (t.cpu().tolist() for t in probs.topk(min(k, probs.shape[1]), dim=1))
    return [[{"class": names[c], "prob": round(p, 6)} for p, c in zip(ps, cs, strict=True)]
            for ps, cs in zip(values, classes, strict=True)]


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
            raise ValueError(f"predictions.top_k must be at least 1, got {top_k}")
        self.output, self.top_k, self.json = output, top_k, json

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        if trainer.predict_loop.num_dataloaders > 1:
            predictions, batch_indices = predictions[0], batch_indices[:1]  # the data modules here have one
        probs = torch.cat([p.float() for p in predictions]) if predictions else torch.empty(0, 1)  # on the CPU
        indices = [i for batch in (batch_indices[0] if batch_indices else []) for i in batch]
        if len(indices) != len(probs):  # a loader without Lightning's index tracking: only one process runs it
            indices = list(range(len(probs)))
        parts = per_process(list(zip(indices, top_classes(probs, pl_module.class_names, self.top_k), strict=True)))
        if trainer.is_global_zero:
            dataset = trainer.predict_dataloaders.dataset if isinstance(trainer.predict_dataloaders, DataLoader) \
                else trainer.predict_dataloaders[0].dataset
            self._write(trainer, pl_module, dataset, parts)
        trainer.strategy.barrier()

    def _write(self, trainer, pl_module, dataset, parts) -> None:
        names = pl_module.class_names
        ranked = dict(pair for part in parts for pair in part)  # a sampler that pads with repeats: one row each
        paths = getattr(dataset, "paths", None) or [path for path, _ in getattr(dataset, "samples", [])] or None
        targets = getattr(dataset, "targets", None)
        fixed = ["index"] + (["path"] if paths else []) + (["target"] if targets is not None else [])
        header = fixed + [f"{col}{j}" for j in range(1, min(self.top_k, len(names)) + 1) for col in ("class", "prob")]
        records = []
        for index in sorted(ranked):
            record = {"index": index}
            if paths:
                record["path"] = str(paths[index])
            if targets is not None:
                record["target"] = names[int(targets[index])]
            records.append({**record, "top_k": ranked[index]})
        output = Path(self.output) if self.output else Path(trainer.default_root_dir) / "predictions.csv"
        with atomic_write(output, newline="") as handle:  # a failure leaves the previous file as it was
            writer = csv.writer(handle)
            writer.writerow(header)
            for record in records:
                writer.writerow([record[key] for key in fixed]
                                + [x for top in record["top_k"] for x in (top["class"], f"{top['prob']:.6f}")])
        say(f"{len(records)} predictions written to {output}")
        if self.json:
            json_path = output.with_suffix(".json")
            with atomic_write(json_path) as handle:
                handle.write(json.dumps(records, indent=1) + "\n")
            say(f"and to {json_path}")
