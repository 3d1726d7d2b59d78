import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torchvision.models import resnet34

from zar.cli import cli
from zar.learn.models import VARIANTS, BasicBlock, ResNet, SqueezeExcite, build_model, count_params, get_variant

NAMES = list(VARIANTS)


def n_params(model):
    return count_params(model)["params_total"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("depth", [18, 34])
def test_forward_shapes_small_input(name, depth):
    model = build_model(name, depth, num_classes=7).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("depth", [18, 34])
def test_forward_shapes_imagenet_size(name, depth):
    model = build_model(name, depth, num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_resnet34_matches_torchvision_exactly():
    ours = build_model("resnet", 34, 10)
    assert n_params(ours) == n_params(resnet34(num_classes=10)) == 21_289_802
    # Same layer shapes in the same order, not only the same total.
    assert [p.shape for p in ours.parameters()] == [p.shape for p in resnet34(num_classes=10).parameters()]


def test_plain_has_no_shortcuts_and_fewer_params():
    plain, res = build_model("plain", 34, 10), build_model("resnet", 34, 10)
    blocks = [m for m in plain.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 16
    assert all(b.downsample is None and not b.skip for b in blocks)
    assert n_params(plain) < n_params(res)
    # The only difference is the three 1x1 projection shortcuts (conv + BN) of stages 2-4.
    projections = sum(c_in * c_out + 2 * c_out for c_in, c_out in [(64, 128), (128, 256), (256, 512)])
    assert n_params(res) - n_params(plain) == projections


def test_plain_block_output_has_no_identity_term():
    block = BasicBlock(8, 8, skip=False).eval()
    nn.init.zeros_(block.conv2.weight)  # residual branch becomes exactly relu(bn(0)) == relu(bias) == 0
    x = torch.rand(1, 8, 4, 4) + 1
    assert torch.count_nonzero(block(x)) == 0
    res_block = BasicBlock(8, 8, skip=True).eval()
    nn.init.zeros_(res_block.conv2.weight)
    assert torch.allclose(res_block(x), x)  # identity passes through


def test_mish_same_count_and_no_relu_outside_se():
    mish = build_model("mish", 34, 10)
    assert n_params(mish) == n_params(build_model("resnet", 34, 10))
    assert not any(isinstance(m, nn.ReLU) for m in mish.modules())
    assert sum(isinstance(m, nn.Mish) for m in mish.modules()) == 1 + 2 * 16


@pytest.mark.parametrize("reduction", [4, 16])
def test_se_adds_exactly_its_formula(reduction):
    def se_count(c, r):
        h = c // r
        return c * h + h + h * c + c  # two 1x1 convs with bias

    blocks = {64: 3, 128: 4, 256: 6, 512: 3}
    expected = sum(n * se_count(c, reduction) for c, n in blocks.items())
    se = build_model("se", 34, 10, se_reduction=reduction)
    assert n_params(se) - n_params(build_model("resnet", 34, 10)) == expected
    se_mish = build_model("se_mish", 34, 10, se_reduction=reduction)
    assert n_params(se_mish) == n_params(se)
    assert sum(isinstance(m, SqueezeExcite) for m in se_mish.modules()) == 16


def test_se_scales_residual_branch_channelwise():
    se = SqueezeExcite(8, reduction=2)
    x = torch.randn(2, 8, 5, 5)
    out = se(x)
    ratio = out / x
    # One factor per (sample, channel), in (0, 1): the same at every spatial position.
    assert torch.allclose(ratio, ratio[..., :1, :1].expand_as(ratio), atol=1e-5)
    assert ((ratio > 0) & (ratio < 1)).all()


def test_weight_init_as_torchvision():
    model = build_model("resnet", 18, 10)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(b.weight == 1) and torch.all(b.bias == 0) for b in bns)
    conv = model.layer3[0].conv1  # fan_out = 256 * 3 * 3
    expected_std = (2 / (256 * 9)) ** 0.5
    assert abs(conv.weight.std().item() - expected_std) / expected_std < 0.05


def test_unknown_variant_and_depth_fail_clearly():
    with pytest.raises(ValueError, match=r"unknown model 'resnext'; valid: plain, resnet, se, mish, se_mish"):
        get_variant("resnext")
    with pytest.raises(ValueError, match=r"unsupported depth 50; valid: 18, 34"):
        ResNet(depth=50)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        ResNet(act="gelu")


def test_display_names_follow_depth_and_reduction():
    assert [v.display_name(34) for v in VARIANTS.values()] == [
        "Plain-34",
        "ResNet-34",
        "SE-ResNet-34",
        "Mish-ResNet-34",
        "SE-Mish-ResNet-34",
    ]
    assert get_variant("se").display_name(18, se_reduction=8) == "SE-ResNet-18 (r=8)"
    assert get_variant("resnet").display_name(18, se_reduction=8) == "ResNet-18"


@pytest.mark.parametrize("name", NAMES)
def test_backward_gives_finite_gradients_everywhere(name):
    model = build_model(name, 18, 4)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


def test_count_params_trainable():
    model = build_model("resnet", 18, 10)
    model.fc.weight.requires_grad_(False)
    counts = count_params(model)
    assert counts["params_total"] - counts["params_trainable"] == 512 * 10


def test_models_command_lists_every_variant():
    result = CliRunner().invoke(cli, ["models"])
    assert result.exit_code == 0, result.output
    assert "| resnet | ResNet-34 | 21,289,802 |" in result.output
    for display in ["Plain-34", "SE-ResNet-34", "Mish-ResNet-34", "SE-Mish-ResNet-34"]:
        assert display in result.output
    result = CliRunner().invoke(cli, ["models", "--depth", "18", "--num-classes", "1000"])
    assert "| resnet | ResNet-18 | 11,689,512 |" in result.output
    result = CliRunner().invoke(cli, ["models", "--depth", "50"])
    assert result.exit_code == 2 and "'50' is not one of '18', '34'" in result.output
