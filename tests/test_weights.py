"""Released-weight loading: official and timm layouts, wrappers, prefixes, wrong files, a new head, and timm /
Hugging Face folders (`convmixer export --format hf`) with their config.json checked against the model."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import timm_to_official
from safetensors.torch import save_file
from torch import nn

from convmixer_pl.hub import write_folder
from convmixer_pl.model import VARIANTS, ConvMixer
from convmixer_pl.module import ConvMixerClassifier
from convmixer_pl.preprocessing import DataConfig
from convmixer_pl.weights import (
    TIMM_VARIANTS,
    WeightsError,
    config_trunk,
    detect_layout,
    load_pretrained,
    official_to_timm,
    read_file,
    timm_architecture,
)

DIM, DEPTH, K, P, CLASSES = 16, 3, 5, 4, 7


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


def official_convmixer(dim, depth, kernel_size, patch_size, n_classes, act=nn.GELU):
    """The paper's `convmixer.py`, layer for layer: the source of the official key layout."""
    return nn.Sequential(
        nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size), act(), nn.BatchNorm2d(dim),
        *[nn.Sequential(
            Residual(nn.Sequential(nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"), act(),
                                   nn.BatchNorm2d(dim))),
            nn.Conv2d(dim, dim, kernel_size=1), act(), nn.BatchNorm2d(dim),
        ) for _ in range(depth)],
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(dim, n_classes),
    )


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random values in every parameter and BatchNorm buffer, so a misplaced tensor changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(7)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(1))


def ours(act="gelu", num_classes=CLASSES) -> ConvMixer:
    return ConvMixer(DIM, DEPTH, K, P, num_classes=num_classes, act=act).eval()


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_official_file_gives_identical_logits(tmp_path, images, act):
    source = randomize(official_convmixer(DIM, DEPTH, K, P, CLASSES, nn.GELU if act == "gelu" else nn.ReLU))
    keys = list(source.state_dict())
    assert keys[0] == "0.weight" and f"{DEPTH + 5}.weight" in keys and "3.0.fn.0.weight" in keys
    path = tmp_path / f"convmixer_{DIM}_{DEPTH}_ks{K}_p{P}.pth.tar"
    torch.save(source.state_dict(), path)
    model = ours(act)
    load_pretrained(model, path)
    with torch.no_grad():
        assert torch.equal(model(images), source(images))


def test_timm_model_weights_give_identical_logits(tmp_path, images):
    source = randomize(timm.models.convmixer.ConvMixer(DIM, DEPTH, kernel_size=K, patch_size=P,
                                                       num_classes=CLASSES, act_layer=nn.ReLU))
    for path, save in ((tmp_path / "timm.pth", lambda sd, p: torch.save(sd, p)),
                       (tmp_path / "timm.safetensors", lambda sd, p: save_file(sd, str(p)))):
        save(source.state_dict(), path)
        assert detect_layout(source.state_dict()) == "timm"
        model = ours("relu")
        load_pretrained(model, path)
        with torch.no_grad():
            assert torch.equal(model(images), source(images)), path.name


def test_our_weights_load_into_timm_and_official_models(tmp_path, images):
    """The reverse direction: our model's weights, converted, drive timm's and the paper's code to the same logits."""
    model = randomize(ours())
    timm_model = timm.models.convmixer.ConvMixer(DIM, DEPTH, kernel_size=K, patch_size=P, num_classes=CLASSES).eval()
    timm_model.load_state_dict(model.state_dict())
    official = official_convmixer(DIM, DEPTH, K, P, CLASSES).eval()
    torch.save(timm_to_official(model.state_dict()), tmp_path / "official.pth")
    official.load_state_dict(torch.load(tmp_path / "official.pth"))
    with torch.no_grad():
        expected = model(images)
        assert torch.equal(timm_model(images), expected)
        assert torch.equal(official(images), expected)
    assert official_to_timm(timm_to_official(model.state_dict())).keys() == model.state_dict().keys()


@pytest.mark.parametrize("wrap", ["state_dict", "model", "state_dict+module", "lightning"])
def test_wrapped_and_prefixed_checkpoints(tmp_path, images, wrap):
    source = randomize(official_convmixer(DIM, DEPTH, K, P, CLASSES))
    state = source.state_dict()
    if wrap == "state_dict":
        checkpoint = {"state_dict": state, "epoch": 3, "arch": "convmixer"}
    elif wrap == "model":
        checkpoint = {"model": state, "optimizer": {"state": {}, "param_groups": []}}
    elif wrap == "state_dict+module":  # saved from a DDP-wrapped model
        checkpoint = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    else:  # a checkpoint of our own Lightning module
        module = ConvMixerClassifier(dim=DIM, depth=DEPTH, kernel_size=K, patch_size=P, num_classes=CLASSES)
        module.model.load_state_dict(official_to_timm(state))
        checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    torch.save(checkpoint, tmp_path / "wrapped.pth")
    model = ours()
    load_pretrained(model, tmp_path / "wrapped.pth")
    with torch.no_grad():
        assert torch.equal(model(images), source(images))


def test_timm_training_checkpoint_with_argparse_options(tmp_path):
    import argparse

    source = randomize(ours())
    torch.save({"epoch": 1, "state_dict": source.state_dict(), "args": argparse.Namespace(lr=0.01)}, tmp_path / "c")
    assert torch.equal(read_file(tmp_path / "c")["head.weight"], source.state_dict()["head.weight"])


def test_other_class_count_reinitialises_head_and_says_so(tmp_path, images, capsys):
    source = randomize(official_convmixer(DIM, DEPTH, K, P, 1000))
    torch.save(source.state_dict(), tmp_path / "in1k.pth.tar")
    module = ConvMixerClassifier(dim=DIM, depth=DEPTH, kernel_size=K, patch_size=P, num_classes=3,
                                 pretrained=str(tmp_path / "in1k.pth.tar"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1000-class head" in err[0] and "re-initialised" in err[0]
    model = module.model.eval()
    assert model.head.out_features == 3
    assert not torch.equal(model.head.weight, source[DEPTH + 5].weight[:3])
    assert torch.equal(model.stem[0].weight, source[0].weight)
    # the trunk is the file's: features before the head match the source's exactly
    with torch.no_grad():
        assert torch.equal(model.forward_head(model.forward_features(images), pre_logits=True), source[:-1](images))


def test_wrong_architecture_names_keys_and_fix(tmp_path):
    torch.save(official_convmixer(DIM, DEPTH, 7, P, CLASSES).state_dict(), tmp_path / "k7.pth")
    with pytest.raises(WeightsError, match=r"wrong shapes \[blocks\.0\.0\.fn\.0\.weight .*kernel_size 7"):
        load_pretrained(ours(), tmp_path / "k7.pth")


def test_truncated_state_dict_names_missing_keys(tmp_path):
    state = official_convmixer(DIM, DEPTH, K, P, CLASSES).state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(f"{DEPTH + 2}.")}  # last block lost
    state[f"{DEPTH + 5}.weight"] = state.pop(f"{DEPTH + 5}.weight")
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(WeightsError, match=r"missing keys \[blocks\.2\.0\.fn\.0\.weight, blocks\.2\.0\.fn\.0\.bias"):
        load_pretrained(ours(), tmp_path / "short.pth")


def test_unexpected_keys_are_named(tmp_path):
    state = randomize(ours()).state_dict()
    state["blocks.9.1.weight"] = torch.zeros(DIM, DIM, 1, 1)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(WeightsError, match=r"unexpected keys \[blocks\.9\.1\.weight\]"):
        load_pretrained(ours(), tmp_path / "extra.pth")


def test_truncated_or_foreign_files_are_clear_errors(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(randomize(ours()).state_dict(), good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsError, match=r"cut\.pth: cannot read weights"):
        read_file(cut)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "resnet.pth")
    with pytest.raises(WeightsError, match=r"not a ConvMixer state dict \(keys: conv\.weight"):
        read_file(tmp_path / "resnet.pth")
    with pytest.raises(WeightsError, match="no such file"):
        read_file(tmp_path / "absent.pth")


def test_relu_file_into_gelu_model_is_flagged(tmp_path, capsys):
    torch.save(official_convmixer(DIM, DEPTH, K, P, CLASSES, nn.ReLU).state_dict(), tmp_path / "m_relu.pth.tar")
    load_pretrained(ours("gelu"), tmp_path / "m_relu.pth.tar")
    assert "set model.act: relu" in capsys.readouterr().err


def test_load_from_checkpoint_does_not_reread_pretrained(tmp_path):
    source = tmp_path / "released.pth"
    torch.save(randomize(ours()).state_dict(), source)
    module = ConvMixerClassifier(dim=DIM, depth=DEPTH, kernel_size=K, patch_size=P, num_classes=CLASSES,
                                 pretrained=str(source))
    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": "2.6.6"}, ckpt)
    source.unlink()  # the released file is gone; the checkpoint alone must do
    restored = ConvMixerClassifier.load_from_checkpoint(ckpt)
    assert torch.equal(restored.model.stem[0].weight, module.model.stem[0].weight)


# -- timm / Hugging Face folders -------------------------------------------------------------------------------------

def test_timm_names_paper_variants_and_spells_out_other_sizes():
    for name in TIMM_VARIANTS:
        assert timm_architecture(VARIANTS[name]) == (name, {})
        assert timm.is_model(name)
    assert not timm.is_model("convmixer_256_8")  # ours only: spelled out
    assert timm_architecture(VARIANTS["convmixer_256_8"]) == (
        "convmixer_256_8_ks5_p2", {"dim": 256, "depth": 8, "kernel_size": 5, "patch_size": 2})
    # the 768/32 shape with GELU is not timm's convmixer_768_32 (ReLU)
    gelu_768 = {**VARIANTS["convmixer_768_32"], "act": "gelu"}
    assert timm_architecture(gelu_768) == ("convmixer_768_32_ks7_p7",
                                           {"dim": 768, "depth": 32, "kernel_size": 7, "patch_size": 7})
    shape = {"dim": DIM, "depth": DEPTH, "kernel_size": K, "patch_size": P, "act": "relu"}
    name, args = timm_architecture(shape)
    assert (name, args["act_layer"]) == (f"convmixer_{DIM}_{DEPTH}_ks{K}_p{P}_relu", "relu")
    # and back: config.json's architecture and model_args give the same shape, a variant's from its name alone
    assert config_trunk({"architecture": name, "model_args": args}, "config.json") == shape
    assert config_trunk({"architecture": "convmixer_768_32"}, "config.json")["act"] == "relu"


@pytest.fixture
def relu_folder(tmp_path, images):
    """A folder written by `convmixer export --format hf`'s writer from a random ReLU model; and its logits."""
    config = DataConfig(24, mean=(0.5,) * 3, std=(0.25,) * 3, class_names=list("abcdefg"))
    module = ConvMixerClassifier(dim=DIM, depth=DEPTH, kernel_size=K, patch_size=P, act="relu", data_config=config)
    randomize(module.model)
    folder = write_folder(module, tmp_path / "relu_hf")
    with torch.no_grad():
        return folder, module.model(images)


def test_hf_folder_reads_back_as_the_folder_its_config_or_its_weights(relu_folder, images):
    folder, expected = relu_folder
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == f"convmixer_{DIM}_{DEPTH}_ks{K}_p{P}_relu"
    assert config["model_args"]["act_layer"] == "relu" and config["label_names"] == list("abcdefg")
    for path in (folder, folder / "config.json", folder / "model.safetensors"):
        model = ours("relu")
        load_pretrained(model, path)
        with torch.no_grad():
            assert torch.equal(model(images), expected), path.name


def test_hf_folder_of_another_architecture_names_config_and_fix(relu_folder):
    folder, _ = relu_folder
    with pytest.raises(WeightsError, match=r"relu_hf/config\.json: the folder holds convmixer_16_3_ks5_p4_relu "
                                           r"\(dim 16, .*act relu\), the model is .*act gelu: set model\.act relu$"):
        load_pretrained(ours("gelu"), folder)
    with pytest.raises(WeightsError, match=r"set model\.dim 16, model\.act relu$"):
        load_pretrained(ConvMixer(8, DEPTH, K, P, num_classes=CLASSES), folder / "model.safetensors")


def test_hf_folder_problems_are_one_line_errors(relu_folder, tmp_path):
    folder, _ = relu_folder
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="empty is a folder without config.json"):
        load_pretrained(ours(), tmp_path / "empty")
    (folder / "config.json").write_text(json.dumps({**config, "architecture": "resnet18", "model_args": {}}))
    with pytest.raises(WeightsError, match=r"architecture 'resnet18' is not a ConvMixer"):
        load_pretrained(ours("relu"), folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match=r"config\.json: not readable JSON"):
        load_pretrained(ours("relu"), folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no model.safetensors or pytorch_model.bin beside config.json"):
        load_pretrained(ours("relu"), folder)


def test_silu_model_folder_drives_timms_convmixer_to_the_same_logits(tmp_path, images):
    """act silu travels as timm's act_layer name: timm's class built from config.json gives our logits."""
    config = DataConfig(24, mean=(0.5,) * 3, std=(0.25,) * 3, class_names=list("abcdefg"))
    module = ConvMixerClassifier(dim=DIM, depth=DEPTH, kernel_size=K, patch_size=P, act="silu", data_config=config)
    randomize(module.model)
    folder = write_folder(module, tmp_path / "silu_hf")
    args = json.loads((folder / "config.json").read_text())["model_args"]
    assert args["act_layer"] == "silu"
    theirs = timm.models.convmixer.ConvMixer(**{**args, "act_layer": timm.layers.get_act_layer("silu")}).eval()
    theirs.load_state_dict(read_file(folder / "model.safetensors"))
    mine = ours("silu")
    load_pretrained(mine, folder)
    with torch.no_grad():
        expected = module.model.eval()(images)
        assert torch.equal(theirs(images), expected) and torch.equal(mine(images), expected)
