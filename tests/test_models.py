"""Model registry: every family builds, names are checked, taps and classifier are found, Torch-Pruning copes."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp

from aip.config import ConfigError
from aip.models import MODELS, check_model_name, classifier_of, create_model, default_taps
from aip.registry import UnknownNameError


@pytest.mark.parametrize("name", ["cifar_resnet8", "cifar_resnet20", "cifar_resnet32", "cifar_resnet56", "vgg16_bn"])
def test_registered_models_give_class_logits(name: str) -> None:
    model = create_model(name, num_classes=7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_cifar_resnet_sizes_match_the_paper() -> None:
    params = {d: sum(p.numel() for p in create_model(f"cifar_resnet{d}", 10).parameters()) for d in (20, 56, 110)}
    # He et al. report 0.27M, 0.85M and 1.7M; option-B shortcuts add a few thousand
    assert 0.27e6 <= params[20] <= 0.28e6
    assert 0.85e6 <= params[56] <= 0.87e6
    assert 1.73e6 <= params[110] <= 1.75e6
    assert create_model("cifar_resnet20", 10, in_channels=1)(torch.randn(1, 1, 28, 28)).shape == (1, 10)


@pytest.mark.parametrize("name", ["torchvision:resnet18", "timm:resnet18"])
def test_library_models_are_created_with_the_class_count(name: str) -> None:
    model = create_model(name, num_classes=7)
    assert classifier_of(model).out_features == 7
    assert default_taps(model, name) == ["layer1", "layer2", "layer3", "layer4"]


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("nope", "unknown model 'nope'; known: cifar_resnet110"),
        ("torchvision:nope", "unknown torchvision model 'torchvision:nope'"),
        ("timm:nope", "unknown timm model 'timm:nope'"),
        ("torchvision:resnet19", "close names: resnet18"),
        ("timm:resnt18", "close names: resnet18"),
    ],
)
def test_unknown_names_are_refused_with_help(name: str, fragment: str) -> None:
    with pytest.raises(UnknownNameError, match=fragment):
        check_model_name(name)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cifar_resnet20", ["layer1", "layer2", "layer3"]),
        ("vgg16_bn", ["features.12", "features.22", "features.32", "features.42"]),
        ("torchvision:mobilenet_v2", None),
        ("torchvision:squeezenet1_0", None),  # a conv classifier: the taps stop before the head
        ("timm:convnext_atto", ["stages.0", "stages.1", "stages.2", "stages.3"]),
    ],
)
def test_default_taps_exist_and_shrink(name: str, expected: list[str] | None) -> None:
    model = create_model(name, 10).train()
    taps = default_taps(model, name)
    assert model.training and not any(m._forward_hooks for m in model.modules())  # the probe left no trace
    if expected is not None:
        assert taps == expected
    modules = dict(model.named_modules())
    assert not any(t.startswith("classifier") or t.startswith("head") for t in taps)
    shapes = []
    hooks = [modules[t].register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape))) for t in taps]
    model.eval()(torch.randn(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    sizes = [s[-1] for s in shapes]
    assert 2 <= len(taps) <= 4 and all(len(s) == 4 for s in shapes)
    assert all(a > b for a, b in zip(sizes, sizes[1:], strict=False))


def test_default_taps_refuse_token_models() -> None:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, depth=2, dynamic_img_size=True)  # 2 blocks: fast
    with pytest.raises(ValueError, match=r"\(1, 197, 192\), not \(N, 192, H, W\); set model.taps"):
        default_taps(model, "timm:vit_tiny_patch16_224")


def test_torchvision_models_need_three_channels() -> None:
    with pytest.raises(ConfigError, match="model.name: torchvision:resnet18 takes 3 input channels"):
        create_model("torchvision:resnet18", 10, in_channels=1)
    assert create_model("timm:resnet18", 10, in_channels=1).eval()(torch.randn(1, 1, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("name", ["cifar_resnet20", "vgg16_bn"])
def test_classifier_is_the_final_linear(name: str) -> None:
    model = create_model(name, 10)
    assert classifier_of(model) is (model.fc if name.startswith("cifar_resnet") else model.classifier)


@pytest.mark.parametrize("name", ["cifar_resnet20", "vgg16_bn"])
def test_torch_pruning_halves_the_model_and_keeps_the_classes(name: str) -> None:
    model = create_model(name, 10)
    example = torch.randn(1, 3, 32, 32)
    pruner = tp.pruner.BasePruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=0.5,
        ignored_layers=[classifier_of(model)],
    )
    before = sum(p.numel() for p in model.parameters())
    pruner.step()
    assert sum(p.numel() for p in model.parameters()) < 0.5 * before
    assert model(example).shape == (1, 10)


def test_registry_holds_the_cifar_families() -> None:
    assert {"cifar_resnet20", "cifar_resnet32", "cifar_resnet56", "cifar_resnet110", "vgg16_bn"} <= set(MODELS.names())
