"""A trained model as a folder in the layout timm reads from the Hugging Face hub, and its upload.

The folder is what timm's own `save_for_hf` writes for a timm ConvMixer holding our weights (their keys are timm's):
`model.safetensors` and a `config.json` with our class names (`label_names`) and evaluation preprocessing
(`pretrained_cfg`); sizes that are no paper variant spell their arguments out in `model_args` (docs/sharing.md).
Writing needs timm, safetensors and huggingface_hub; uploading needs a network and a hub login.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .weights import timm_architecture, trunk

PACKAGES = ("timm", "safetensors", "huggingface_hub")


class HubError(ValueError):
    """A folder that cannot be written or uploaded; the message says what was done and the fix."""


def timm_model(module):
    """timm's ConvMixer holding the module's weights and preprocessing, and the model_args config.json needs beyond
    what timm records itself."""
    from timm.layers import get_act_layer
    from timm.models import build_model_with_cfg
    from timm.models.convmixer import ConvMixer

    name, model_args = timm_architecture(module.hparams)
    shape = trunk(module.hparams)
    act = get_act_layer(shape.pop("act"))
    pretrained_cfg = dict(architecture=name, num_classes=module.num_classes, **module.data_config.pretrained_cfg(),
                          first_conv="stem.0", classifier="head")
    # timm's builder attaches pretrained_cfg and the traits its writer reads; no registry entry is involved
    model = build_model_with_cfg(ConvMixer, name, False, pretrained_cfg=pretrained_cfg, **shape, act_layer=act,
                                 in_chans=module.model.in_chans, num_classes=module.num_classes)
    model.load_state_dict(module.model.state_dict())  # strict: our keys are timm's
    return model.eval(), model_args


def check_packages() -> None:
    if missing := [name for name in PACKAGES if importlib.util.find_spec(name) is None]:
        raise HubError(f"--format hf writes with timm's own writer and needs {', '.join(PACKAGES)} "
                       f"({', '.join(missing)} missing): pip install \"convmixer-pl[hub]\"")


def write_folder(module, folder: str | os.PathLike) -> Path:
    """Write `folder` (model.safetensors, config.json) with timm's own writer; returns it."""
    check_packages()
    from timm.models import save_for_hf

    folder = Path(folder)
    model, model_args = timm_model(module)
    save_for_hf(model, str(folder), model_config={"label_names": module.class_names}, model_args=model_args,
                safe_serialization=True)
    return folder


def push(folder: Path, repo_id: str) -> str:
    """Upload `folder` to the hub repo `repo_id` (created if needed); returns the commit's URL."""
    from huggingface_hub import HfApi  # there: writing the folder checked the packages
    from huggingface_hub.utils import HfHubHTTPError

    not_uploaded = f"nothing was uploaded; {folder} is written: upload it later with `hf upload {repo_id} {folder}`"
    try:
        api = HfApi()
        repo = api.create_repo(repo_id, exist_ok=True)
        commit = api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder),
                                   commit_message="Add ConvMixer (convmixer export --format hf)")
    except HfHubHTTPError as err:  # before the network check: some versions' HTTP errors are OSErrors too
        raise HubError(f"--push_to_hub {repo_id}: the hub refused ({_first_line(err)}; log in with `hf auth "
                       f"login`, or check the repo id); {not_uploaded}") from err
    except ValueError as err:  # a malformed repo id, found before any request
        raise HubError(f"--push_to_hub {repo_id}: {_first_line(err)}; {not_uploaded}") from err
    except Exception as err:
        if not _network_failure(err):
            raise
        raise HubError(f"--push_to_hub {repo_id}: the Hugging Face hub cannot be reached (no network: "
                       f"{type(err).__name__}: {_first_line(err)}), so {not_uploaded}") from err
    return str(getattr(commit, "commit_url", commit))


def _network_failure(err: BaseException) -> bool:
    """A connection that could not be made: an OSError (socket, offline mode) or an HTTP client's connect or
    timeout error, anywhere in the chain (huggingface_hub's HTTP clients differ between versions)."""
    while err is not None:
        if isinstance(err, OSError) or any(word in type(err).__name__ for word in ("Connect", "Timeout", "Network")):
            return True
        err = err.__cause__ or err.__context__
    return False


def _first_line(err: BaseException) -> str:
    return " ".join(str(err).split("\n", 1)[0].split())[:200] or type(err).__name__
