"""Export a trained checkpoint for deployment, with a dynamic batch size, or to share it with timm.

    convmixer export --ckpt_path checkpoints/digits/last.ckpt --format onnx --output model.onnx
    convmixer export --ckpt_path checkpoints/digits/last.ckpt --format pt2 --output model.pt2
    convmixer export --ckpt_path checkpoints/digits/last.ckpt --format hf --output digits_hf [--push-to-hub REPO]

(`python -m convmixer_pl.export ...` is the same.)

`onnx`: ONNX (opset 18 by default, at least 17) through torch.onnx's exporter; run it with onnxruntime.
`pt2`: a `torch.export` program; load it with `torch.export.load(path).module()`.
(TorchScript is not offered: torch.jit is deprecated in favour of torch.export.)
`hf`: a folder in the layout timm reads from the Hugging Face hub (`hub.py`, docs/sharing.md); `--push-to-hub`
uploads it.

The exported graph maps normalised images (N, in_chans, image_size, image_size) to logits (N, num_classes). The
preprocessing and class names (image_size, in_chans, mean, std, crop_pct, interpolation, class_names) travel with
the file as JSON: ONNX metadata property `convmixer`, the extra file `convmixer.json` of a .pt2 archive, and
timm's `pretrained_cfg` and `label_names` in the folder's config.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import torch

from . import hub
from .checkpoints import load_module
from .console import fail, run_entry_point, say

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
    return torch.randn(batch_size, in_chans, size, size)  # batch 2: the batch dimension is not specialised to 1


_DYNAMIC_BATCH = ({0: torch.export.Dim("batch")},)


def write_onnx(module, output: Path, opset: int = 18) -> None:
    program = torch.onnx.export(module.model, (example_input(module),), None, input_names=["images"],
                                output_names=["logits"], opset_version=opset, dynamo=True,
                                dynamic_shapes=_DYNAMIC_BATCH, verbose=False)
    program.model.metadata_props["convmixer"] = json.dumps(metadata(module))
    program.save(str(output))


def write_pt2(module, output: Path, **_) -> None:
    program = torch.export.export(module.model, (example_input(module),), dynamic_shapes=_DYNAMIC_BATCH)
    torch.export.save(program, output, extra_files={"convmixer.json": json.dumps(metadata(module))})


def write_hf(module, output: Path, **_) -> None:
    hub.write_folder(module, output)


# format: (default output: the checkpoint's stem + this, writer(module, output, opset=...))
FORMATS = {"onnx": (".onnx", write_onnx), "pt2": (".pt2", write_pt2), "hf": ("_hf", write_hf)}


def check_request(fmt: str, opset: int) -> None:
    """Refuse a bad request before the checkpoint is read."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if fmt == "onnx" and opset < 17:
        raise ExportError(f"--opset {opset}: use 17 or newer")
    if fmt == "onnx" and not all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript")):
        raise ExportError('ONNX export needs onnx and onnxscript: pip install "convmixer-pl[export]"')
    if fmt == "hf":
        hub.check_packages()


def export(ckpt_path: str | os.PathLike, fmt: str = "onnx", output: str | os.PathLike | None = None,
           opset: int = 18) -> Path:
    """Export the checkpoint's network (without its Lightning wrapper) and return the written path."""
    check_request(fmt, opset)
    module = load_module(ckpt_path)  # on the CPU, in eval mode
    suffix, write = FORMATS[fmt]
    output = Path(output) if output else Path(ckpt_path).with_name(Path(ckpt_path).stem + suffix)
    output.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        write(module, output, opset=opset)
    return output


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="convmixer export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by `convmixer fit`")
    parser.add_argument("--format", default="onnx", choices=list(FORMATS),
                        help="onnx (default), pt2 (torch.export) or hf (a timm / Hugging Face hub folder)")
    parser.add_argument("--output", help="file (folder for hf) to write; default: beside the checkpoint, named "
                                         "after it (last.onnx, last.pt2, last_hf)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17; default 18)")
    parser.add_argument("--push-to-hub", metavar="REPO", help="with --format hf: also upload the folder to this "
                                                              "Hugging Face hub repo (needs a network and `hf auth "
                                                              "login`)")
    args = parser.parse_args(argv)
    prog = "convmixer export"
    if args.push_to_hub and args.format != "hf":
        fail(f"--push-to-hub uploads a timm folder: use it with --format hf, not {args.format}", prog)
    path = run_entry_point(lambda: export(args.ckpt_path, args.format, args.output, args.opset), prog=prog)
    say(f"exported {args.ckpt_path} to {path}")
    if args.push_to_hub:
        url = run_entry_point(lambda: hub.push(path, args.push_to_hub), prog=prog)
        say(f"uploaded {path} to the Hugging Face hub: {url}")
    return path


if __name__ == "__main__":
    main()
