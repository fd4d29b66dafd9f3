"""`convmixer export`: ONNX (run by onnxruntime) and torch.export programs match PyTorch; the timm /
Hugging Face folder loads in timm itself (its own loaders, no mocks) and in our model.pretrained, to the same logits."""

from __future__ import annotations

import json
import socket

import huggingface_hub
import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch
from conftest import run_main
from timm.layers import get_act_layer
from timm.models import load_checkpoint
from timm.models._hub import load_model_config_from_path  # what timm's local-dir: source reads config.json with
from timm.models.convmixer import ConvMixer as TimmConvMixer
from torch import nn

from convmixer_pl.checkpoints import load_module
from convmixer_pl.module import ConvMixerClassifier
from convmixer_pl.preprocessing import DataConfig


@pytest.fixture(scope="module")
def trained(digits_run):
    """The fit's checkpoint and its network, on the CPU in eval mode."""
    ckpt = digits_run / "last.ckpt"
    return ckpt, load_module(ckpt).model


def inputs(batch: int) -> torch.Tensor:
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(batch))


def export(capsys, ckpt, fmt: str, output, *extra: str):
    """`convmixer export` in this process; the path it says it wrote."""
    code, err = run_main(capsys, "export", "--ckpt_path", ckpt, "--format", fmt, "--output", output, *extra)
    assert code == 0, err
    assert err.strip().splitlines()[-1] == f"convmixer export: wrote {output}"
    return output


def test_onnx_export_matches_pytorch_for_batch_sizes_1_and_3(trained, tmp_path, capsys):
    ckpt, network = trained
    path = export(capsys, ckpt, "onnx", tmp_path / "m.onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch dimension
    meta = json.loads({p.key: p.value for p in model.metadata_props}["convmixer"])
    assert meta["label_names"] == [str(i) for i in range(10)] and meta["num_classes"] == 10
    assert meta["pretrained_cfg"] == {"input_size": [1, 8, 8], "mean": [0.5], "std": [0.5], "crop_pct": 1.0,
                                      "interpolation": "bilinear"}
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = inputs(batch)
        (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            expected = network(x).numpy()
        assert logits.shape == (batch, 10)
        np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-4)


def test_torch_export_program_matches_pytorch_for_batch_sizes_1_and_3(trained, tmp_path, capsys):
    ckpt, network = trained
    path = export(capsys, ckpt, "pt2", tmp_path / "m.pt2")
    extra = {"convmixer.json": ""}
    program = torch.export.load(path, extra_files=extra)
    assert json.loads(extra["convmixer.json"])["pretrained_cfg"]["input_size"] == [1, 8, 8]
    exported = program.module()
    for batch in (1, 3):
        x = inputs(batch)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), network(x), atol=1e-6, rtol=1e-5)


def test_export_refuses_bad_requests_with_one_line_errors(trained, tmp_path, capsys):
    ckpt, _ = trained
    not_a_checkpoint = tmp_path / "notes.ckpt"
    not_a_checkpoint.write_text("hello")
    for args, message in ((["--ckpt_path", str(ckpt), "--opset", "16"], "--opset 16: use 17 or newer"),
                          (["--ckpt_path", str(not_a_checkpoint)], "is not a checkpoint torch can read"),
                          (["--ckpt_path", str(tmp_path / "missing.ckpt")], "no such file"),
                          (["--ckpt_path", str(ckpt), "--push_to_hub", "someone/digits"], "use it with --format hf"),
                          (["--ckpt_path", str(ckpt), "--format", "hf", "--output", str(not_a_checkpoint)],
                           "notes.ckpt is a file; --format hf writes a folder"),
                          (["--ckpt_path", str(ckpt), "--output", str(tmp_path)], "is a folder; give a file name")):
        code, err = run_main(capsys, "export", "--output", tmp_path / "m.onnx", *args)
        assert code == 2, err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and message in errors[0], err
    assert not (tmp_path / "m.onnx").exists()


def test_every_export_of_a_checkpoint_carries_the_same_preprocessing(trained, tmp_path, capsys):
    ckpt, _ = trained
    onnx_meta = json.loads({p.key: p.value for p in onnx.load(str(export(capsys, ckpt, "onnx", tmp_path / "m.onnx"))
                                                              ).metadata_props}["convmixer"])
    extra = {"convmixer.json": ""}
    torch.export.load(export(capsys, ckpt, "pt2", tmp_path / "m.pt2"), extra_files=extra)
    hf = json.loads((export(capsys, ckpt, "hf", tmp_path / "hf") / "config.json").read_text())
    expected = load_module(ckpt).data_config.pretrained_cfg()
    for source in (onnx_meta, json.loads(extra["convmixer.json"])):
        assert source["pretrained_cfg"] == expected and source["label_names"] == hf["label_names"]
    assert {key: hf["pretrained_cfg"][key] for key in expected} == expected


def test_export_replaces_an_older_output_whole(trained, tmp_path, capsys):
    ckpt, _ = trained
    old = tmp_path / "m.onnx"
    old.write_bytes(b"an older export")
    export(capsys, ckpt, "onnx", old)
    assert onnx.load(str(old)).graph.input[0].name == "images"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary file left beside it


# -- the timm / Hugging Face folder ----------------------------------------------------------------------------------

def export_hf(ckpt, folder):
    from convmixer_pl.export import export as export_function

    return export_function(str(ckpt), "hf", str(folder))


def as_json(value):
    return json.loads(json.dumps(value))  # tuples as lists, as config.json holds them


def test_hf_folder_of_another_size_loads_in_timms_convmixer_class(trained, tmp_path):
    ckpt, network = trained
    module = load_module(ckpt)
    folder = export_hf(ckpt, tmp_path / "digits_hf")
    assert sorted(path.name for path in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "convmixer_16_2_ks3_p2" and config["num_classes"] == 10
    assert config["label_names"] == module.class_names == [str(i) for i in range(10)]
    assert config["model_args"] == {"dim": 16, "depth": 2, "kernel_size": 3, "patch_size": 2, "in_chans": 1,
                                    "num_classes": 10, "global_pool": "avg"}  # no act_layer: GELU, timm's default
    preprocessing = {key: config["pretrained_cfg"][key] for key in module.data_config.pretrained_cfg()}
    assert preprocessing == as_json(module.data_config.pretrained_cfg())
    assert preprocessing["input_size"] == [1, 8, 8] and preprocessing["mean"] == [0.5]

    pretrained_cfg, name, model_args = load_model_config_from_path(folder)
    assert name == "convmixer_16_2_ks3_p2" and pretrained_cfg["label_names"] == module.class_names
    act_layer = get_act_layer(model_args.get("act_layer", "gelu"))
    timm_model = TimmConvMixer(**{**model_args, "act_layer": act_layer}).eval()
    load_checkpoint(timm_model, str(folder / "model.safetensors"), strict=True)
    with pytest.raises(RuntimeError, match="Unknown model"):  # not a registered size: the class it is
        timm.create_model(f"local-dir:{folder}", pretrained=True)

    hparams = {key: module.hparams[key] for key in ("dim", "depth", "kernel_size", "patch_size", "in_chans")}
    x = inputs(3)
    with torch.no_grad():
        expected = network(x)
        assert torch.equal(timm_model(x), expected)
        for path in (folder, folder / "config.json", folder / "model.safetensors"):  # model.pretrained reads it back
            ours = ConvMixerClassifier(**hparams, num_classes=10, pretrained=str(path)).model.eval()
            assert torch.equal(ours(x), expected), path.name


def random_norm_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm statistics and affine values that are not the identity, so they count in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            for tensor in (norm.weight, norm.bias, norm.running_mean):
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.3)
            norm.running_var.copy_(torch.rand(norm.running_var.shape, generator=g) + 0.5)
    return model.eval()


@pytest.mark.parametrize("variant", ["convmixer_1024_20_ks9_p14", "convmixer_768_32"])  # GELU, and ReLU
def test_hf_folder_of_a_paper_variant_loads_with_timm_create_model(tmp_path, variant):
    """A randomly initialised paper-variant model (24M / 21M parameters) on 28 px images: cheap, and timm builds it
    from its registered name with the folder's weights, preprocessing and class names."""
    names = ["cat", "dog", "owl"]
    module = ConvMixerClassifier(variant=variant, data_config=DataConfig(
        28, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), crop_pct=0.9, interpolation="bicubic", class_names=names))
    network = random_norm_statistics(module.model)
    ckpt = tmp_path / "variant.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    folder = export_hf(ckpt, tmp_path / "variant_hf")
    ckpt.unlink()
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == variant and config["label_names"] == names
    assert config["model_args"] == {"in_chans": 3, "num_classes": 3, "global_pool": "avg"}  # the name says the rest

    timm_model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert isinstance(timm_model.stem[1], nn.ReLU if variant == "convmixer_768_32" else nn.GELU)
    assert timm_model.pretrained_cfg["label_names"] == names
    assert as_json(timm.data.resolve_model_data_config(timm_model)) == {  # timm's eval transform will use these
        "input_size": [3, 28, 28], "interpolation": "bicubic", "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3],
        "crop_pct": 0.9, "crop_mode": "center"}
    overlay = timm.create_model(variant, pretrained=True, **config["model_args"],  # timm without local-dir:
                                pretrained_cfg_overlay={**config["pretrained_cfg"],
                                                        "file": str(folder / "model.safetensors")}).eval()
    ours = ConvMixerClassifier(variant=variant, num_classes=3, pretrained=str(folder)).model.eval()
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = network(x)
        assert torch.equal(timm_model(x), expected)
        assert torch.equal(overlay(x), expected)
        assert torch.equal(ours(x), expected)


def closed_port() -> int:
    """A loopback port that nothing listens on: connecting to it is refused, as with no network."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "no route"])
def test_push_to_hub_without_network_says_so_and_keeps_the_folder(trained, tmp_path, capsys, monkeypatch, offline):
    if offline == "HF_HUB_OFFLINE":  # huggingface_hub's own offline switch (the variable, read at its import)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    else:  # the hub's address refuses the connection, whether or not this machine has a network
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    ckpt, _ = trained
    folder = tmp_path / "digits_hf"
    code, err = run_main(capsys, "export", "--ckpt_path", ckpt, "--format", "hf", "--output", folder,
                         "--push_to_hub", "someone/convmixer-digits")
    assert code == 2
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    assert "--push_to_hub someone/convmixer-digits: the Hugging Face hub cannot be reached (no network" in errors[0]
    assert f"nothing was uploaded; {folder} is written" in errors[0]
    assert json.loads((folder / "config.json").read_text())["architecture"] == "convmixer_16_2_ks3_p2"
    assert (folder / "model.safetensors").stat().st_size > 0
