"""Released ConvMixer weights: read official or timm files into our model.

Layouts (see `model.py`): *official* is the paper's flat `nn.Sequential` (`0.*` patch conv, `2.*` its BatchNorm,
`{i+3}.*` block i, `{depth+5}.*` the head); *timm* is `stem.*`, `blocks.{i}.*`, `head.*`, which is also ours.
Files may hold the bare state dict or wrap it (`state_dict`, `model`, `state_dict_ema`: Lightning, timm and
training-script checkpoints), with `module.` (DDP), `model.` (our Lightning module) or `_orig_mod.`
(torch.compile) prefixes. `.safetensors` files need the `safetensors` package.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .console import say
from .model import ConvMixer

_WRAPPERS = ("state_dict", "model", "state_dict_ema", "model_ema")
_PREFIXES = ("module.", "model.", "_orig_mod.")
_OFFICIAL_KEY = re.compile(r"^(\d+)\.(.+)$")


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model; the message names the file and keys."""


def unwrap(checkpoint: Mapping, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor state dict inside `checkpoint`, with wrapper keys and `module.`/`model.` prefixes removed."""
    state = checkpoint
    while not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            raise WeightsError(f"{source}: no state dict found (top-level keys: {sorted(state)[:8]}); expected "
                               f"tensors, or a dict under one of {list(_WRAPPERS)}")
        state = inner
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    stripped = True
    while stripped and state:
        stripped = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """'official' (flat nn.Sequential indices) or 'timm' (stem/blocks/head); anything else is an error."""
    keys = list(state_dict)
    if keys and all(_OFFICIAL_KEY.match(k) for k in keys):
        return "official"
    if keys and all(k.split(".", 1)[0] in ("stem", "blocks", "head") for k in keys):
        return "timm"
    sample = ", ".join(keys[:5]) or "none"
    raise WeightsError(f"not a ConvMixer state dict (keys: {sample}, ...): expected the official layout (0.*, 2.*, "
                       "3.0.fn.0.*, ...) or timm's (stem.*, blocks.*, head.*)")


def official_depth(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Depth of an official state dict: its highest index is the head, `depth + 5`."""
    return max(int(_OFFICIAL_KEY.match(k).group(1)) for k in state_dict) - 5


def official_to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    depth = official_depth(state_dict)
    out = {}
    for key, value in state_dict.items():
        index, rest = _OFFICIAL_KEY.match(key).groups()
        i = int(index)
        if i in (0, 2):
            out[f"stem.{i}.{rest}"] = value
        elif 3 <= i < depth + 3:
            out[f"blocks.{i - 3}.{rest}"] = value
        elif i == depth + 5:
            out[f"head.{rest}"] = value
        else:  # pooling and flatten hold no tensors
            raise WeightsError(f"official key {key!r} has no place in a depth-{depth} ConvMixer")
    return out


def to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported layout -> ours (timm's key names)."""
    return official_to_timm(state_dict) if detect_layout(state_dict) == "official" else dict(state_dict)


def read_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file of either layout (.pth, .pth.tar, .pt, .bin, .ckpt or .safetensors) into ours."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"model.pretrained {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError as err:
                raise WeightsError(f"{path}: reading .safetensors needs the safetensors package "
                                   "(pip install safetensors)") from err
            checkpoint = load_file(str(path), device="cpu")
        else:
            # tensors and plain containers only; timm's training checkpoints also pickle their argparse options
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as err:  # truncated zip, not a checkpoint, foreign pickled objects: all say which file
        raise WeightsError(f"{path}: cannot read weights ({type(err).__name__}: {str(err).splitlines()[0]})") from err
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(f"{path}: holds a {type(checkpoint).__name__}, not a state dict")
    return to_ours(unwrap(checkpoint, str(path)))


def describe(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The architecture a state dict of our layout was saved from (activation aside: it has no weights)."""
    try:
        dim, in_chans, patch_size, _ = state_dict["stem.0.weight"].shape
        kernel_size = state_dict["blocks.0.0.fn.0.weight"].shape[-1]
        num_classes = state_dict["head.weight"].shape[0]
    except KeyError as err:
        raise WeightsError(f"state dict lacks {err.args[0]!r}, so it is not a complete ConvMixer") from err
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    return dict(dim=dim, depth=depth, kernel_size=kernel_size, patch_size=patch_size, in_chans=in_chans,
                num_classes=num_classes)


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], n: int = 6) -> None:
    """Load `state` into `model` strictly; what does not fit (missing and unexpected keys, wrong shapes as file vs
    model, at most `n` of each in state-dict order) is one WeightsError."""
    own = model.state_dict()
    wrong = {k: f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)}
    # torch raises on a wrong shape even when not strict: those are left out and reported with the keys
    result = model.load_state_dict({k: v for k, v in state.items() if k not in wrong}, strict=False)

    def short(items: list[str]) -> str:
        return "[" + ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "") + "]"

    problems = [(label, items) for label, items in (("missing keys", result.missing_keys),
                                                    ("unexpected keys", result.unexpected_keys),
                                                    ("wrong shapes", list(wrong.values()))) if items]
    if problems:
        raise WeightsError("; ".join(f"{label} {short(items)}" for label, items in problems))


def load_into(model: ConvMixer, state_dict: Mapping[str, torch.Tensor], source: str = "weights") -> bool:
    """Copy `state_dict` (our layout) into `model`. A head of another class count is left out (the model keeps its
    freshly initialised head); returns whether that happened. Anything else that does not fit is an error."""
    own_head = model.head.weight
    state = dict(state_dict)
    file_head = state.get("head.weight")
    # a headless file (timm's num_classes=0) or one for another class count: keep our new head
    head_reset = file_head is None or (file_head.shape != own_head.shape and file_head.shape[1:] == own_head.shape[1:])
    if head_reset:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        state.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
    try:
        load_state(model, state)
    except WeightsError as err:
        hint = ""
        try:
            arch = describe(state_dict)
            hint = (f"; the file is a ConvMixer-{arch['dim']}/{arch['depth']} kernel_size {arch['kernel_size']} "
                    f"patch_size {arch['patch_size']} in_chans {arch['in_chans']}: set model.* to match")
        except WeightsError:
            pass
        raise WeightsError(f"{source} does not fit the model: {err}{hint}") from None
    return head_reset


def load_pretrained(model: ConvMixer, path: str | Path) -> None:
    """`model.pretrained`: read `path` (either layout, detected), load it, and say in one line what changed."""
    state = read_file(path)
    head = state.get("head.weight")
    if load_into(model, state, f"model.pretrained {path}"):
        found = "no head" if head is None else f"a {head.shape[0]}-class head"
        say(f"model.pretrained {path}: the file has {found}, the model {model.num_classes} classes: "
              "the head is re-initialised")
    uses_relu = isinstance(model.stem[1], nn.ReLU)
    if "relu" in Path(path).name.lower() and not uses_relu:
        say(f"model.pretrained {path}: the file name says ReLU but model.act is gelu; "
              "set model.act: relu for this file (the 768/32 release uses ReLU)")
