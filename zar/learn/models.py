"""One configurable ResNet (BasicBlock) and the study's variants as data.

Every architecture of the study is the same network with different switches:
``skip`` (residual shortcuts on/off), ``attn`` (none or squeeze-and-excitation)
and ``act`` (ReLU or Mish). The stem, stage widths and weight init follow
torchvision's ``resnet34`` so that ``ResNet-34`` here has exactly its parameter count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..variants import STAGE_BLOCKS, VARIANTS, Variant, get_variant  # noqa: F401  (re-exported)

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "mish": nn.Mish}
STAGE_WIDTHS = (64, 128, 256, 512)


def get_act_layer(name: str) -> type[nn.Module]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}") from None


class SqueezeExcite(nn.Module):
    """Hu et al. 2018: pool -> C/r -> ReLU -> C -> sigmoid -> scale channels."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=True)
        self.act = nn.ReLU(inplace=True)  # the gate's own ReLU, part of SE, not of the variant
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean(dim=(2, 3), keepdim=True)
        scale = self.fc2(self.act(self.fc1(scale)))
        return x * scale.sigmoid()


class BasicBlock(nn.Module):
    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        skip: bool = True,
        act_layer: type[nn.Module] = nn.ReLU,
        attn_layer: Callable[[int], nn.Module] | None = None,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.se = attn_layer(channels) if attn_layer is not None else None
        self.act2 = act_layer(inplace=True)
        self.skip = skip
        # A plain network (He et al. 2016) has no shortcut at all, not even a projection.
        self.downsample = None
        if skip and (stride != 1 or in_channels != channels):
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        if self.skip:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.act2(out)


class ResNet(nn.Module):
    def __init__(
        self,
        depth: int = 34,
        num_classes: int = 1000,
        skip: bool = True,
        attn: str | None = None,
        se_reduction: int = 16,
        act: str = "relu",
        in_channels: int = 3,
    ):
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"unsupported depth {depth}; valid: {', '.join(map(str, STAGE_BLOCKS))}")
        if attn not in (None, "se"):
            raise ValueError(f"unknown attention {attn!r}; valid: none, se")
        if se_reduction < 1:
            raise ValueError(f"se_reduction must be >= 1, got {se_reduction}")
        act_layer = get_act_layer(act)
        attn_layer = (lambda c: SqueezeExcite(c, se_reduction)) if attn == "se" else None

        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act1 = act_layer(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_ch, stages = 64, []
        for i, (blocks, width) in enumerate(zip(STAGE_BLOCKS[depth], STAGE_WIDTHS)):
            stages.append(_make_stage(in_ch, width, blocks, 1 if i == 0 else 2, skip, act_layer, attn_layer))
            in_ch = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """torchvision's init: He init for convs (fan_out keeps the backward signal's scale),
        BN as the identity; the linear head keeps PyTorch's default."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _make_stage(
    in_channels: int,
    width: int,
    blocks: int,
    stride: int,
    skip: bool,
    act_layer: type[nn.Module],
    attn_layer: Callable[[int], nn.Module] | None,
) -> nn.Sequential:
    """One stage: its first block changes width and stride, the others keep them."""
    layers = [BasicBlock(in_channels, width, stride, skip, act_layer, attn_layer)]
    layers += [BasicBlock(width, width, 1, skip, act_layer, attn_layer) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def build_model(name: str, depth: int = 34, num_classes: int = 10, se_reduction: int = 16) -> ResNet:
    v = get_variant(name)
    return ResNet(depth, num_classes, skip=v.skip, attn=v.attn, se_reduction=se_reduction, act=v.act)


def count_params(model: nn.Module) -> dict[str, int]:
    params = list(model.parameters())
    return {
        "params_total": sum(p.numel() for p in params),
        "params_trainable": sum(p.numel() for p in params if p.requires_grad),
    }
