"""The ConvMixer network: shapes, the paper's parameter counts, input sizes, bad arguments, the residual's place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import convmixer_pl
from convmixer_pl.model import ConvMixer, create_model

CONFIGS = Path(convmixer_pl.__file__).resolve().parents[1] / "configs"


def test_output_and_feature_shapes():
    model = ConvMixer(dim=16, depth=2, kernel_size=5, patch_size=4, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_features(x).shape == (2, 16, 8, 8)
    assert model(x).shape == (2, 7)


@pytest.mark.parametrize(("name", "expected"), [
    ("convmixer_1536_20", 51_625_960),
    ("convmixer_768_32", 21_110_248),
    ("convmixer_1024_20_ks9_p14", 24_383_464),
])
def test_imagenet_parameter_counts(name, expected):
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = create_model(name, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize(("name", "act"), [("convmixer_1536_20", nn.GELU), ("convmixer_768_32", nn.ReLU),
                                           ("convmixer_1024_20_ks9_p14", nn.GELU)])
def test_variant_activation(name, act):
    with torch.device("meta"):
        model = create_model(name)
    acts = [m for m in model.modules() if isinstance(m, (nn.GELU, nn.ReLU))]
    assert acts and all(type(m) is act for m in acts)


def test_create_model_overrides_and_rejects_unknown_names():
    with torch.device("meta"):
        assert create_model("convmixer_256_8", num_classes=100).head.out_features == 100
    with pytest.raises(ValueError, match="convmixer_1536_20"):
        create_model("convmixer_1536_21")


def test_reset_classifier_swaps_only_the_head():
    model = ConvMixer(dim=16, depth=1, kernel_size=3, patch_size=2, num_classes=10).eval()
    x = torch.randn(2, 3, 8, 8)
    features = model.forward_features(x)
    stem = model.stem[0].weight.clone()
    model.reset_classifier(7)
    assert model.num_classes == 7 and model.head.out_features == 7 and model(x).shape == (2, 7)
    assert torch.equal(model.stem[0].weight, stem) and torch.equal(model.forward_features(x), features)


@pytest.mark.parametrize(("height", "width"), [(7, 7), (9, 7), (7, 9), (37, 53), (64, 29), (31, 31)])
def test_variable_input_sizes(height, width):
    model = ConvMixer(dim=8, depth=1, kernel_size=3, patch_size=7, num_classes=5, image_size=32).eval()
    x = torch.randn(2, 3, height, width)
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, 8, height // 7, width // 7)
        assert model(x).shape == (2, 5)


def test_forward_features_and_head_compose_to_forward():
    torch.manual_seed(0)
    model = ConvMixer(dim=12, depth=2, kernel_size=3, patch_size=3, num_classes=4).eval()
    x = torch.randn(3, 3, 20, 17)
    with torch.no_grad():
        features = model.forward_features(x)
        assert torch.equal(model.forward_head(features), model(x))
        pooled = model.forward_head(features, pre_logits=True)
    assert pooled.shape == (3, 12)
    assert torch.allclose(pooled, features.mean(dim=(2, 3)), atol=1e-6)
    assert torch.allclose(model.head(pooled), model(x), atol=1e-6)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(dim=0, depth=2), "dim"),
    (dict(dim=-8, depth=2), "dim"),
    (dict(dim=8, depth=0), "depth"),
    (dict(dim=8, depth=-1), "depth"),
    (dict(dim=8, depth=2, kernel_size=4), "kernel_size"),
    (dict(dim=8, depth=2, patch_size=8, image_size=7), "patch_size"),
    (dict(dim=8, depth=2, act="swish"), "act"),
])
def test_bad_construction_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConvMixer(**kwargs)


def test_input_smaller_than_patch():
    model = ConvMixer(dim=8, depth=1, kernel_size=3, patch_size=7).eval()
    for shape in [(1, 3, 6, 20), (1, 3, 20, 6)]:
        with pytest.raises(ValueError, match="patch_size 7"):
            model(torch.randn(shape))


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


def _official(dim, depth, kernel_size, patch_size, n_classes, whole_block_residual=False):
    """The paper's flat `nn.Sequential`, written out here independently of the package."""
    def block():
        depthwise = nn.Sequential(nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"), nn.GELU(),
                                  nn.BatchNorm2d(dim))
        pointwise = [nn.Conv2d(dim, dim, kernel_size=1), nn.GELU(), nn.BatchNorm2d(dim)]
        if whole_block_residual:  # the wrong placement, as a control that the comparison can tell them apart
            return nn.Sequential(_Residual(nn.Sequential(depthwise, *pointwise)))
        return nn.Sequential(_Residual(depthwise), *pointwise)

    return nn.Sequential(
        nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size), nn.GELU(), nn.BatchNorm2d(dim),
        *[block() for _ in range(depth)],
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(dim, n_classes),
    )


def _official_to_ours(key: str, depth: int) -> str:
    index, rest = key.split(".", 1)
    index = int(index)
    if index < 3:
        return f"stem.{index}.{rest}"
    if index == depth + 5:
        return f"head.{rest}"
    return f"blocks.{index - 3}.{rest}"


@pytest.mark.parametrize("whole_block_residual", [False, True])
def test_residual_wraps_only_the_depthwise_part(whole_block_residual):
    dim, depth, k, p, classes = 8, 3, 5, 2, 6
    torch.manual_seed(0)
    official = _official(dim, depth, k, p, classes, whole_block_residual)
    with torch.no_grad():  # non-trivial BatchNorm statistics so eval-mode logits exercise every tensor
        for name, tensor in official.state_dict().items():
            if name.endswith(("running_mean", "weight", "bias")) and tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor) * 0.5)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand_like(tensor) + 0.5)
    ours = ConvMixer(dim, depth, k, p, num_classes=classes)
    state = official.state_dict()
    if whole_block_residual:  # `j.0.fn.0.*` -> `j.0.*`, `j.0.fn.1.*` -> `j.{1,3}.*`: same tensors, other keys
        state = {_rename_whole_block(key): value for key, value in state.items()}
    ours.load_state_dict({_official_to_ours(key, depth): value for key, value in state.items()}, strict=True)
    x = torch.randn(2, 3, 16, 12)
    for mode in ("eval", "train"):
        official.train(mode == "train")
        ours.train(mode == "train")
        with torch.no_grad():
            same = torch.allclose(ours(x), official(x), atol=1e-5)
        assert same is (not whole_block_residual), mode


def _rename_whole_block(key: str) -> str:
    parts = key.split(".")
    if len(parts) > 4 and parts[1:3] == ["0", "fn"]:
        if parts[3] == "0":  # the depthwise Sequential inside the wrongly placed residual
            return ".".join([parts[0], "0", "fn"] + parts[4:])
        return ".".join([parts[0], str(int(parts[3]))] + parts[4:])  # the pointwise conv / BN
    return key
