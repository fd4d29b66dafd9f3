"""Released ConvMixer weights: read official or timm files into our model.

Layouts: *official* is the paper's flat `nn.Sequential` (`0.*` patch conv, `2.*` its BatchNorm, `{i+3}.*` block i,
`{depth+5}.*` the head); *timm* (`stem.*`, `blocks.{i}.*`, `head.*`) is also ours. The state dict may be bare or
wrapped (`state_dict`, `model`, `state_dict_ema`), its keys prefixed by `module.` (DDP), `model.` (our Lightning
module) or `_orig_mod.` (torch.compile). `.safetensors` files need the `safetensors` package.

A *timm / Hugging Face folder* (`convmixer export --format hf`, a timm hub repo) holds `config.json` and
`model.safetensors` (or `pytorch_model.bin`); `model.pretrained` may name the folder or either file, and the
config's architecture must be the model's (activation included: weights cannot show it). The paper's variants go
by timm's registered names; other sizes are spelled out in `model_args` (`timm_architecture`).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .console import say
from .model import ACTIVATIONS, VARIANTS, ConvMixer

_WRAPPERS = ("state_dict", "model", "state_dict_ema", "model_ema")
_PREFIXES = ("module.", "model.", "_orig_mod.")
_OFFICIAL_KEY = re.compile(r"^(\d+)\.(.+)$")

# registered in timm with exactly these VARIANTS settings (convmixer_768_32 with act_layer=nn.ReLU);
# convmixer_256_8 is ours only
TIMM_VARIANTS = ("convmixer_1536_20", "convmixer_768_32", "convmixer_1024_20_ks9_p14")
HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # in the order timm prefers them in a folder
# what shapes the weights, and the activation; defaults are ConvMixer's and timm's constructors'
_TRUNK_DEFAULTS = {"dim": None, "depth": None, "kernel_size": 9, "patch_size": 7, "act": "gelu"}


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
    while state and (prefix := next((p for p in _PREFIXES if all(k.startswith(p) for k in state)), None)):
        state = {k[len(prefix):]: v for k, v in state.items()}
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


def official_to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    depth = max(int(_OFFICIAL_KEY.match(k).group(1)) for k in state_dict) - 5  # the highest index is the head
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


def read_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file of either layout (.pth, .pth.tar, .pt, .bin, .ckpt or .safetensors) into ours."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"model.pretrained {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            checkpoint = load_file(str(path), device="cpu")
        else:
            # tensors and plain containers only; timm's training checkpoints also pickle their argparse options
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError as err:
        raise WeightsError(f"{path}: reading .safetensors needs the safetensors package "
                           "(pip install safetensors)") from err
    except Exception as err:  # truncated zip, not a checkpoint, foreign pickled objects: all say which file
        raise WeightsError(f"{path}: cannot read weights ({type(err).__name__}: {str(err).splitlines()[0]})") from err
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(f"{path}: holds a {type(checkpoint).__name__}, not a state dict")
    state = unwrap(checkpoint, str(path))
    return official_to_timm(state) if detect_layout(state) == "official" else state  # ours are timm's key names


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


# -- timm's names for an architecture, and its hub folders -------------------------------------------------------

def trunk(arch: Mapping) -> dict:
    """dim, depth, kernel_size, patch_size and act of an architecture (hparams, a VARIANTS entry), defaults filled."""
    return {key: arch.get(key, default) for key, default in _TRUNK_DEFAULTS.items()}


def timm_architecture(arch: Mapping) -> tuple[str, dict]:
    """timm's name for an architecture and the model_args (beyond in_chans and num_classes) that rebuild it: a paper
    variant is its registered name alone (`timm.create_model` builds it); any other size is named like the release
    files (`convmixer_16_2_ks3_p2`, `..._relu`) and spelled out for timm's `ConvMixer` class, `act_layer` being a
    timm activation name (`timm.layers.get_act_layer`), left out for GELU, the class's default."""
    args = trunk(arch)
    if name := next((name for name in TIMM_VARIANTS if trunk(VARIANTS[name]) == args), None):
        return name, {}
    name = "convmixer_{dim}_{depth}_ks{kernel_size}_p{patch_size}".format(**args)
    if (act := args.pop("act")) != "gelu":
        args["act_layer"], name = act, f"{name}_{act}"
    return name, args


def config_trunk(config: Mapping, source: str) -> dict:
    """The architecture a timm config.json describes (the inverse of `timm_architecture`)."""
    name, args = config.get("architecture"), config.get("model_args") or {}
    if name in TIMM_VARIANTS:
        return trunk(VARIANTS[name])
    if not (isinstance(name, str) and name.startswith("convmixer") and "dim" in args and "depth" in args):
        raise WeightsError(f"{source}: architecture {name!r} is not a ConvMixer (expected one of "
                           f"{', '.join(TIMM_VARIANTS)}, or model_args with dim and depth as `convmixer export "
                           "--format hf` writes)")
    act = str(args.get("act_layer", "gelu")).lower()
    if act not in ACTIVATIONS:
        raise WeightsError(f"{source}: model_args act_layer {act!r} is not one of ConvMixer's {sorted(ACTIVATIONS)}")
    return trunk({**args, "act": act})


def hf_weights(path: Path, model: ConvMixer) -> Path | None:
    """The weights file of the timm / Hugging Face folder that `path` names (the folder, its config.json or its
    weights), its config.json checked against `model`; None if `path` names no such folder."""
    folder = path if path.is_dir() else path.parent
    if not ((path.is_dir() or path.name in (HF_CONFIG, *HF_WEIGHTS)) and (folder / HF_CONFIG).is_file()):
        return None
    source = f"model.pretrained {folder / HF_CONFIG}"
    try:
        config = json.loads((folder / HF_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise WeightsError(f"{source}: not readable JSON ({err}); export the folder again") from err
    if not isinstance(config, Mapping):
        raise WeightsError(f"{source}: holds a {type(config).__name__}, not a timm model config")
    theirs, ours = config_trunk(config, source), trunk({**describe(model.state_dict()), "act": model.act})
    if theirs != ours:
        fix = ", ".join(f"model.{key} {theirs[key]}" for key in theirs if theirs[key] != ours[key])
        raise WeightsError(f"{source}: the folder holds {config.get('architecture')} ({_spelled(theirs)}), the "
                           f"model is {_spelled(ours)}: set {fix}")
    weights = path if path.name in HF_WEIGHTS else next(filter(Path.is_file, (folder / n for n in HF_WEIGHTS)), None)
    if weights is None:
        raise WeightsError(f"model.pretrained {folder}: no {' or '.join(HF_WEIGHTS)} beside config.json; export "
                           "the folder again")
    return weights


def _spelled(shape: Mapping) -> str:
    return ", ".join(f"{key} {value}" for key, value in shape.items())


def state_differences(model: nn.Module, state: Mapping[str, torch.Tensor], n: int = 6) -> str | None:
    """What keeps `state` from loading into `model` strictly (missing and unexpected keys, wrong shapes as file vs
    model, at most `n` of each in state-dict order), or None; compares names and shapes only."""
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]

    def short(items: list[str]) -> str:
        return "[" + ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "") + "]"

    problems = {"missing keys": [k for k in own if k not in state],
                "unexpected keys": [k for k in state if k not in own], "wrong shapes": wrong}
    return "; ".join(f"{label} {short(items)}" for label, items in problems.items() if items) or None


def load_pretrained(model: ConvMixer, path: str | Path) -> None:
    """`model.pretrained`: read `path` (either layout, detected; or a timm / Hugging Face folder, checked against
    its config.json), load it, and say in one line what changed. A head for another class count is left out (the
    model keeps its freshly initialised head); anything else that does not fit is an error."""
    path = Path(path)
    if from_folder := hf_weights(path, model):
        path = from_folder
    elif path.is_dir():
        raise WeightsError(f"model.pretrained {path} is a folder without {HF_CONFIG}; name a weights file, or a "
                           "folder written by `convmixer export --format hf`")
    state = read_file(path)
    file_head, own_head = state.get("head.weight"), model.head.weight
    # a headless file (timm's num_classes=0) or one for another class count: keep our new head
    head_reset = file_head is None or (file_head.shape != own_head.shape and file_head.shape[1:] == own_head.shape[1:])
    loaded = {k: v for k, v in state.items() if not (head_reset and k.startswith("head."))}
    if head_reset:
        loaded.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
    if problems := state_differences(model, loaded):
        hint = ""
        try:
            arch = describe(state)
            hint = (f"; the file is a ConvMixer-{arch['dim']}/{arch['depth']} kernel_size {arch['kernel_size']} "
                    f"patch_size {arch['patch_size']} in_chans {arch['in_chans']}: set model.* to match")
        except WeightsError:
            pass
        raise WeightsError(f"model.pretrained {path} does not fit the model: {problems}{hint}")
    model.load_state_dict(loaded)
    if head_reset:
        found = "no head" if file_head is None else f"a {file_head.shape[0]}-class head"
        say(f"model.pretrained {path}: the file has {found}, the model {model.num_classes} classes: "
            "the head is re-initialised")
    if from_folder is None and "relu" in path.name.lower() and model.act != "relu":
        # a folder's config.json was checked
        say(f"model.pretrained {path}: the file name says ReLU but model.act is {model.act}; "
            "set model.act: relu for this file (the 768/32 release uses ReLU)")
