"""Export a trained checkpoint for deployment, with a dynamic batch size.

    convmixer export --ckpt_path checkpoints/digits/last.ckpt --format onnx --output model.onnx
    convmixer export --ckpt_path checkpoints/digits/last.ckpt --format pt2 --output model.pt2

(`python -m convmixer_pl.export ...` is the same.)

`onnx`: ONNX (opset 18 by default, at least 17) through torch.onnx's exporter; run it with onnxruntime.
`pt2`: a `torch.export` program; load it with `torch.export.load(path).module()`.
(TorchScript is not offered: torch.jit is deprecated in favour of torch.export.)

The exported graph maps normalised images (N, in_chans, image_size, image_size) to logits (N, num_classes). The
preprocessing and class names (image_size, in_chans, mean, std, crop_pct, interpolation, class_names) travel with
the file as JSON: ONNX metadata property `convmixer`, and the extra file `convmixer.json` of a .pt2 archive.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import torch

from .checkpoints import load_module
from .console import run_entry_point, say

FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}
METADATA_KEYS = ("image_size", "in_chans", "num_classes", "mean", "std", "crop_pct", "interpolation")


class ExportError(ValueError):
    """A bad export request; the message names the option and the fix."""


def metadata(module) -> dict:
    """The preprocessing and class names that travel with an exported file."""
    hparams = module.hparams
    meta = {key: hparams.get(key) for key in METADATA_KEYS}
    meta["class_names"] = module.class_names
    meta["output"] = "logits"
    return meta


def example_input(module, batch_size: int = 2) -> torch.Tensor:
    in_chans, size, _ = module.data_config["input_size"]
    if not size:
        raise ExportError("the checkpoint has no image_size; it is needed to trace the model")
    return torch.randn(batch_size, in_chans, size, size)


def export(ckpt_path: str | os.PathLike, fmt: str = "onnx", output: str | os.PathLike | None = None,
           opset: int = 18) -> Path:
    """Export the checkpoint's network (without its Lightning wrapper) and return the written path."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if fmt == "onnx" and opset < 17:
        raise ExportError(f"--opset {opset}: use 17 or newer")
    if fmt == "onnx" and not all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript")):
        raise ExportError('ONNX export needs onnx and onnxscript: pip install "convmixer-pl[export]"')
    module = load_module(ckpt_path)
    network = module.model  # in eval mode: load_module
    output = Path(output) if output else Path(ckpt_path).with_suffix(FORMATS[fmt])
    output.parent.mkdir(parents=True, exist_ok=True)
    x = example_input(module)
    meta = json.dumps(metadata(module))
    # batch 2 when tracing so the batch dimension is not specialised to 1
    dynamic = ({0: torch.export.Dim("batch")},)
    with torch.no_grad():
        if fmt == "onnx":
            program = torch.onnx.export(network, (x,), None, input_names=["images"], output_names=["logits"],
                                        opset_version=opset, dynamo=True, dynamic_shapes=dynamic, verbose=False)
            program.model.metadata_props["convmixer"] = meta
            program.save(str(output))
        else:
            program = torch.export.export(network, (x,), dynamic_shapes=dynamic)
            torch.export.save(program, output, extra_files={"convmixer.json": meta})
    return output


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="convmixer export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by `convmixer fit`")
    parser.add_argument("--format", default="onnx", choices=list(FORMATS), help="onnx (default) or pt2 (torch.export)")
    parser.add_argument("--output", help="file to write; default: the checkpoint's path with .onnx or .pt2")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17; default 18)")
    args = parser.parse_args(argv)
    path = run_entry_point(lambda: export(args.ckpt_path, args.format, args.output, args.opset),
                           prog="convmixer export")
    say(f"exported {args.ckpt_path} to {path}")
    return path


if __name__ == "__main__":
    main()
