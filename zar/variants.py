"""The study's architectures as data: one word each, used everywhere.

The word is the registry key, ``--model``/``-P model=``, the ``zar.model`` tag and the
table's row; the switches say how the one configurable ResNet is built. No torch here,
so the command line can list and check names without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass

# Blocks per stage of each supported depth (BasicBlock ResNets, as He et al. 2016 and torchvision).
STAGE_BLOCKS: dict[int, tuple[int, int, int, int]] = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
DEPTHS = tuple(STAGE_BLOCKS)


@dataclass(frozen=True)
class Variant:
    """A study architecture: a name, a display stem and the switches that make it."""

    name: str
    display: str  # "{depth}" is filled in, e.g. "SE-ResNet-{depth}"
    skip: bool = True
    attn: str | None = None
    act: str = "relu"

    def display_name(self, depth: int = 34, se_reduction: int = 16) -> str:
        name = self.display.format(depth=depth)
        if self.attn == "se" and se_reduction != 16:
            name += f" (r={se_reduction})"
        return name


VARIANTS: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    if variant.name in VARIANTS:
        raise ValueError(f"variant {variant.name!r} is already registered")
    VARIANTS[variant.name] = variant
    return variant


register(Variant("plain", "Plain-{depth}", skip=False))
register(Variant("resnet", "ResNet-{depth}"))
register(Variant("se", "SE-ResNet-{depth}", attn="se"))
register(Variant("mish", "Mish-ResNet-{depth}", act="mish"))
register(Variant("se_mish", "SE-Mish-ResNet-{depth}", attn="se", act="mish"))


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(VARIANTS)}") from None
