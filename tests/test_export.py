"""`python -m convmixer_pl.export`: ONNX (run by onnxruntime) and torch.export programs match PyTorch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from convmixer_pl.checkpoints import load_module
from convmixer_pl.export import main


@pytest.fixture(scope="module")
def trained(digits_run):
    """The fit's checkpoint and its network, on the CPU in eval mode."""
    ckpt = digits_run / "last.ckpt"
    return ckpt, load_module(ckpt).model


def inputs(batch: int) -> torch.Tensor:
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(batch))


def test_onnx_export_matches_pytorch_for_batch_sizes_1_and_3(trained, tmp_path):
    ckpt, network = trained
    path = main(["--ckpt_path", str(ckpt), "--format", "onnx", "--output", str(tmp_path / "m.onnx")])
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch dimension
    meta = json.loads({p.key: p.value for p in model.metadata_props}["convmixer"])
    assert meta["class_names"] == [str(i) for i in range(10)] and meta["mean"] == [0.5] and meta["image_size"] == 8
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = inputs(batch)
        (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            expected = network(x).numpy()
        assert logits.shape == (batch, 10)
        np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-4)


def test_torch_export_program_matches_pytorch_for_batch_sizes_1_and_3(trained, tmp_path):
    ckpt, network = trained
    path = main(["--ckpt_path", str(ckpt), "--format", "pt2", "--output", str(tmp_path / "m.pt2")])
    extra = {"convmixer.json": ""}
    program = torch.export.load(path, extra_files=extra)
    assert json.loads(extra["convmixer.json"])["in_chans"] == 1
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
                          (["--ckpt_path", str(tmp_path / "missing.ckpt")], "no such file")):
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--output", str(tmp_path / "m.onnx")])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
