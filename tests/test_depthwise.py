"""DepthwiseConv2d: nn.Conv2d's parameters and outputs, with the CPU weight gradient computed in fp32 (bf16) or by a
compiled kernel (channels_last, kernel 5); and the fallback to oneDNN when that kernel cannot be compiled."""

from __future__ import annotations

import os
import subprocess
import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import convmixer_pl.depthwise as depthwise
from convmixer_pl.depthwise import DepthwiseConv2d
from convmixer_pl.model import ConvMixer
from convmixer_pl.module import ConvMixerClassifier

CHANNELS, KERNEL = 8, 5


@pytest.fixture(params=["onednn", "compiled"])
def weight_grad_path(request, monkeypatch):
    """Route the weight gradient through oneDNN's fp32 one, or through the compiled kernel (on a tiny tensor)."""
    monkeypatch.setattr(depthwise, "COMPILED_MIN_NUMEL", 0 if request.param == "compiled" else 2**62)
    monkeypatch.setattr(depthwise, "_compiled_keys", set())
    monkeypatch.setattr(depthwise, "_checked_keys", set())
    yield request.param
    assert bool(depthwise._compiled_keys) == (request.param == "compiled")  # the path taken was the one asked for


def _pair() -> tuple[DepthwiseConv2d, torch.nn.Conv2d]:
    conv = DepthwiseConv2d(CHANNELS, KERNEL)
    stock = torch.nn.Conv2d(CHANNELS, CHANNELS, KERNEL, groups=CHANNELS, padding="same")
    stock.load_state_dict(conv.state_dict())
    return conv, stock


def _reference_grads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grad_out: torch.Tensor):
    """The fp32 gradients of the weight and bias, from fp32 copies of the given values."""
    weight = weight.detach().float().requires_grad_()
    bias = bias.detach().float().requires_grad_()
    F.conv2d(x.detach().float(), weight, bias, padding=KERNEL // 2, groups=CHANNELS).backward(grad_out.float())
    return weight.grad, bias.grad


def test_bf16_weight_gradient_is_the_fp32_one(weight_grad_path):
    conv, stock = _pair()
    x = torch.randn(4, CHANNELS, 12, 12).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad_out = torch.randn(4, CHANNELS, 12, 12).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    outputs, grads = [], []
    for module in (conv, stock):
        x.grad = None
        with torch.autocast("cpu", torch.bfloat16):
            out = module(x)
        out.backward(grad_out)
        outputs.append(out)
        grads.append((x.grad.clone(), module.weight.grad.clone(), module.bias.grad.clone()))
    assert torch.equal(outputs[0], outputs[1]) and outputs[0].dtype == torch.bfloat16  # same forward
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=0, rtol=0)  # same input gradient
    # the weight and bias gradients: the fp32 computation on the same bf16 values
    ref_w, ref_b = _reference_grads(x.to(torch.bfloat16), conv.weight.to(torch.bfloat16), conv.bias, grad_out)
    torch.testing.assert_close(grads[0][1], ref_w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0][2], ref_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1][1], ref_w, atol=0.1, rtol=0.05)  # the stock bf16 one: close, coarser


def test_fp32_channels_last_gradients_match_nn_conv2d(weight_grad_path):
    conv, stock = _pair()
    x = torch.randn(3, CHANNELS, 10, 10).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(3, CHANNELS, 10, 10).contiguous(memory_format=torch.channels_last)
    grads = []
    for module in (conv, stock):
        xi = x.clone().requires_grad_()
        out = module(xi)
        out.backward(grad_out)
        grads.append((out.detach(), xi.grad, module.weight.grad, module.bias.grad))
    for ours, theirs in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_compiled_kernel_is_used_only_where_it_was_measured_faster(monkeypatch):
    monkeypatch.setattr(depthwise, "COMPILED_MIN_NUMEL", 1000)
    monkeypatch.setattr(depthwise, "_compiled_keys", set())
    x = torch.randn(2, CHANNELS, 8, 8)
    g = torch.randn(2, CHANNELS, 8, 8)
    cl = dict(memory_format=torch.channels_last)
    parts = depthwise._compiled_parts(x.contiguous(**cl), g.contiguous(**cl), padding=2)  # kernel 5
    assert parts is not None and [len(x[part]) for part in parts] == [2]  # one chunk: the whole small batch
    assert depthwise._compiled_parts(x.contiguous(**cl), g.contiguous(**cl), padding=1) is None  # kernel 3: oneDNN's
    assert depthwise._compiled_parts(x.contiguous(**cl), g.contiguous(**cl), padding=4) is None  # kernel 9
    assert depthwise._compiled_parts(x, g, padding=2) is None  # NCHW
    assert depthwise._compiled_parts(x[:1].contiguous(**cl), g[:1].contiguous(**cl), padding=2) is None  # too small


def test_eval_and_frozen_weights_take_nn_conv2d_path():
    conv, _ = _pair()
    x = torch.randn(2, CHANNELS, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert conv(x).grad_fn is None
    conv.weight.requires_grad_(False)
    with torch.autocast("cpu", torch.bfloat16):
        assert "ConvolutionBackward" in type(conv(x.requires_grad_()).grad_fn).__name__


def test_a_compiled_kernel_that_disagrees_with_onednn_is_dropped(monkeypatch):
    """Wrong generated code (NaNs, values from memory it never wrote) is caught on a shape's first call: that call
    returns oneDNN's gradient and the rest of the process uses oneDNN."""
    monkeypatch.setattr(depthwise, "COMPILED_MIN_NUMEL", 0)
    monkeypatch.setattr(depthwise, "_compiled_keys", set())
    monkeypatch.setattr(depthwise, "_checked_keys", set())
    calls = []

    def wrong(x, grad_out, padding):
        calls.append(x.shape)
        w, b = depthwise._weight_grad_taps(x, grad_out, padding)
        return w.index_fill(0, torch.tensor([1]), float("nan")), b

    monkeypatch.setattr(depthwise, "_compiled_fn", wrong)
    conv, stock = _pair()
    x = torch.randn(2, CHANNELS, 8, 8).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(2, CHANNELS, 8, 8).contiguous(memory_format=torch.channels_last)
    with pytest.warns(UserWarning, match="disagreed with oneDNN"):
        conv(x).backward(grad_out)
    stock(x).backward(grad_out)
    torch.testing.assert_close(conv.weight.grad, stock.weight.grad)
    assert depthwise._compiled_fn is False and len(calls) == 1
    conv.weight.grad = None
    conv(x).backward(grad_out)  # oneDNN from now on: the wrong kernel is not called again
    assert len(calls) == 1 and torch.isfinite(conv.weight.grad).all()


def test_a_large_batch_is_reduced_in_chunks_that_add_up_to_the_whole(monkeypatch):
    monkeypatch.setattr(depthwise, "COMPILED_MIN_NUMEL", 0)
    monkeypatch.setattr(depthwise, "CHUNK_NUMEL", 3 * CHANNELS * 8 * 8)  # three images per call: 3 + 3 + 2
    monkeypatch.setattr(depthwise, "_compiled_keys", set())
    monkeypatch.setattr(depthwise, "_checked_keys", set())
    conv, stock = _pair()
    x = torch.randn(8, CHANNELS, 8, 8).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(8, CHANNELS, 8, 8).contiguous(memory_format=torch.channels_last)
    conv(x).backward(grad_out)
    stock(x).backward(grad_out)
    assert {key[0] for key in depthwise._compiled_keys} == {(3, CHANNELS, 8, 8), (2, CHANNELS, 8, 8)}
    torch.testing.assert_close(conv.weight.grad, stock.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(conv.bias.grad, stock.bias.grad, atol=1e-5, rtol=1e-4)


HELD_TO_AVX2 = """
import warnings, torch
import convmixer_pl.depthwise as depthwise
x = torch.randn(64, 256, 16, 16).contiguous(memory_format=torch.channels_last)
grad_out = torch.randn(64, 256, 16, 16).contiguous(memory_format=torch.channels_last)
weight = torch.randn(256, 1, 5, 5)
with warnings.catch_warnings():
    warnings.simplefilter("error")  # a dropped kernel warns: that is a failure here
    grad_w, grad_b = depthwise._weight_grad(x, grad_out, weight, True)
assert depthwise._compiled_fn not in (None, False) and depthwise._checked_keys
_, ref_w, ref_b = depthwise.onednn_backward(grad_out, x, weight, [False, True, True])
torch.testing.assert_close(grad_w, ref_w, atol=1e-2, rtol=1e-3)
print("agrees at", torch.backends.cpu.get_cpu_capability())
"""


def test_the_compiled_kernel_is_right_where_the_cpu_capability_is_held_to_avx2(tmp_path):
    """A kernel that Inductor compiled at the hardware's width was once reused under ATEN_CPU_CAPABILITY=avx2 from its
    cache (NaNs; the fit that found it went nan at step 4): the width is now set, so it is in the cache key. The
    cache is shared with a run at the hardware's width first, as it was then."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("an x86 CPU with AVX2 is needed to hold ATen to AVX2")
    env = dict(os.environ, OMP_NUM_THREADS="2", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    native = torch.backends.cpu.get_cpu_capability()
    for held, capability in (({}, native), ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, "AVX2")):
        done = subprocess.run([sys.executable, "-c", HELD_TO_AVX2], env=env | held, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0 and f"agrees at {capability}" in done.stdout, done.stderr[-3000:]


FALLBACK = """
import warnings, torch
import convmixer_pl.depthwise as depthwise
depthwise.COMPILED_MIN_NUMEL = 0
conv = depthwise.DepthwiseConv2d(8, 5)
stock = torch.nn.Conv2d(8, 8, 5, groups=8, padding="same")
stock.load_state_dict(conv.state_dict())
x = torch.randn(2, 8, 8, 8).contiguous(memory_format=torch.channels_last)
grad_out = torch.randn(2, 8, 8, 8).contiguous(memory_format=torch.channels_last)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    conv(x).backward(grad_out)
stock(x).backward(grad_out)
torch.testing.assert_close(conv.weight.grad, stock.weight.grad)
assert depthwise._compiled_fn is False, depthwise._compiled_fn
print([str(w.message) for w in caught if "depthwise" in str(w.message)][0])
"""


def test_without_a_cxx_compiler_the_gradient_falls_back_to_onednn(tmp_path):
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"),
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", FALLBACK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiling the CPU weight-gradient kernel failed" in done.stdout
    assert "using oneDNN's" in done.stdout


def test_convmixer_training_step_uses_the_compiled_kernel_and_keeps_the_gradients(weight_grad_path):
    torch.manual_seed(0)
    model = ConvMixer(dim=16, depth=2, kernel_size=KERNEL, patch_size=2, num_classes=10, image_size=16)
    model.to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))
    grads = []
    for enabled in (True, False):  # ours, then nn.Conv2d's backward
        for module in model.modules():
            if isinstance(module, DepthwiseConv2d):
                module.fast_cpu_grad = enabled
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
        for name, p in model.named_parameters():  # autograd's layout contract (DDP buckets rely on it)
            assert p.grad.stride() == p.stride(), name
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_lightning_bf16_fit_step_runs_through_the_compiled_kernel(monkeypatch):
    monkeypatch.setattr(depthwise, "COMPILED_MIN_NUMEL", 0)
    monkeypatch.setattr(depthwise, "_compiled_keys", set())
    module = ConvMixerClassifier(dim=16, depth=2, kernel_size=KERNEL, patch_size=2, num_classes=10, image_size=16)
    before = module.model.blocks[0][0].fn[0].weight.detach().clone()
    data = TensorDataset(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)))
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(data, batch_size=4))
    key = next(iter(depthwise._compiled_keys))
    assert key[0] == (4, 16, 8, 8) and key[1] == key[2] == torch.bfloat16  # bf16 activations, channels_last
    assert not torch.equal(module.model.blocks[0][0].fn[0].weight, before)
