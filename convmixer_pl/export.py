"""`convmixer export`: a trained checkpoint for deployment, with a dynamic batch size, or to share it with timm.

    convmixer export --ckpt_path checkpoints/digits/last.ckpt --format onnx|pt2|hf [--output PATH]
    convmixer export --ckpt_path checkpoints/digits/last.ckpt --format hf --output digits_hf [--push_to_hub REPO]

`onnx` goes through torch.onnx's exporter, `pt2` is a `torch.export` program (not TorchScript: torch.jit is
deprecated in favour of torch.export), `hf` a folder in the layout timm reads from the Hugging Face hub (`hub.py`).
The graph maps normalised images (N, C, H, W) to logits (N, num_classes); the checkpoint's data config travels with
it in timm's terms (the ONNX metadata property `convmixer`, the .pt2 archive's extra file `convmixer.json`, the
folder's config.json). Each output is written under a temporary name and moved into place.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Literal

import torch

from . import hub
from .checkpoints import load_module
from .console import say
from .files import OutputError, atomic_write, temporary_path


class ExportError(ValueError):
    """A bad export request; the message names the option and the fix."""


def metadata(module) -> dict:
    """The preprocessing and class names that travel with an exported file, in timm's config.json terms."""
    return {"pretrained_cfg": module.data_config.pretrained_cfg(), "label_names": module.class_names,
            "num_classes": module.num_classes, "output": "logits"}


def example_input(module) -> torch.Tensor:
    return torch.randn(2, *module.data_config.input_size)  # batch 2: not specialised to 1


_DYNAMIC_BATCH = ({0: torch.export.Dim("batch")},)


def write_onnx(module, output: Path, opset: int = 18) -> None:
    program = torch.onnx.export(module.model, (example_input(module),), None, input_names=["images"],
                                output_names=["logits"], opset_version=opset, dynamo=True,
                                dynamic_shapes=_DYNAMIC_BATCH, verbose=False)
    program.model.metadata_props["convmixer"] = json.dumps(metadata(module))
    tmp = temporary_path(output)
    try:
        program.save(str(tmp))  # to a path (over 2 GB, with external data): staged beside the target, then moved
        os.replace(tmp, output)
    except OSError as err:
        raise OutputError(f"cannot write {output} ({err.strerror or err}); choose another --output") from err
    finally:
        tmp.unlink(missing_ok=True)


def write_pt2(module, output: Path, **_) -> None:
    program = torch.export.export(module.model, (example_input(module),), dynamic_shapes=_DYNAMIC_BATCH)
    with atomic_write(output, "wb") as f:
        torch.export.save(program, f, extra_files={"convmixer.json": json.dumps(metadata(module))})


def write_hf(module, output: Path, **_) -> None:
    """Written beside `output` and swapped in: an old folder stays whole until the new one is."""
    if output.exists() and not output.is_dir():
        raise ExportError(f"--output {output} is a file; --format hf writes a folder: choose another --output")
    tmp, old = temporary_path(output), temporary_path(output.with_name(output.name + ".old"))
    try:
        hub.write_folder(module, tmp)
        if output.exists():
            os.replace(output, old)
        os.replace(tmp, output)
    except OSError as err:
        raise OutputError(f"cannot write {output} ({err.strerror or err}); choose another --output") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


# format: (default output: the checkpoint's stem + this, writer(module, output, opset=...))
FORMATS = {"onnx": (".onnx", write_onnx), "pt2": (".pt2", write_pt2), "hf": ("_hf", write_hf)}


def export(ckpt_path: str, format: Literal["onnx", "pt2", "hf"] = "onnx", output: str | None = None,
           opset: int = 18, push_to_hub: str | None = None) -> Path:
    """Export a checkpoint: ONNX, torch.export (.pt2) or a timm / Hugging Face folder.

    Args:
        ckpt_path: Checkpoint written by `convmixer fit`.
        format: onnx, pt2 (torch.export) or hf (a timm / Hugging Face hub folder).
        output: File (folder for hf) to write; default: beside the checkpoint, named after it (last.onnx,
            last.pt2, last_hf).
        opset: ONNX opset (17 or newer).
        push_to_hub: With format hf: also upload the folder to this Hugging Face hub repo (needs a network and
            `hf auth login`).
    """
    # a bad request is refused before the checkpoint is read
    if push_to_hub and format != "hf":
        raise ExportError(f"--push_to_hub uploads a timm folder: use it with --format hf, not {format}")
    if format not in FORMATS:
        raise ExportError(f"--format {format}: choose one of {', '.join(FORMATS)}")
    if format == "onnx" and opset < 17:
        raise ExportError(f"--opset {opset}: use 17 or newer")
    if format == "onnx" and not all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript")):
        raise ExportError('ONNX export needs onnx and onnxscript: pip install "convmixer-pl[export]"')
    if format == "hf":
        hub.check_packages()
    module = load_module(ckpt_path)  # on the CPU, in eval mode
    if module.data_config is None:
        raise ExportError("the checkpoint stores no data config (preprocessing and classes); export a checkpoint "
                          "written by `convmixer fit`")
    suffix, write = FORMATS[format]
    path = Path(output) if output else Path(ckpt_path).with_name(Path(ckpt_path).stem + suffix)
    if format != "hf" and path.is_dir():
        raise ExportError(f"--output {path} is a folder; give a file name such as "
                          f"{path / (Path(ckpt_path).stem + suffix)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        write(module, path, opset=opset)
    if push_to_hub:
        say(f"uploaded {path} to the Hugging Face hub: {hub.push(path, push_to_hub)}")
    return path
