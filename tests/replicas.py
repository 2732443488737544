"""Small replicas of the blocks real architectures put BN in (torchvision is not available here).

Each builder returns a fresh ``nn.Module``; ``REPLICAS`` maps a name to ``(builder, input shape,
expected number of BN that fold into a conv/linear, expected number left as a frozen affine)``.
``randomize_bn(model, seed)`` gives every BN non-trivial statistics and affine parameters, so a
wrong fold cannot hide behind mean 0, variance 1. ``resnet50`` / ``mobilenet_v2`` are full-depth
models for the benchmark; ``resnet152`` has 155 BN for timing ``fold`` itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU, eps=1e-5, conv=nn.Conv2d):
    layers = [
        conv(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=eps),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- ResNet / ResNeXt


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))  # the ReLU module is used twice, as in torchvision
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    def __init__(self, cin, width, cout, stride=1, groups=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(
        self,
        block="bottleneck",
        layers=(1, 1),
        width=8,
        groups=1,
        num_classes=10,
        imagenet_stem=False,
    ):
        super().__init__()
        self.stem = conv_bn(3, width, 3)
        if (
            imagenet_stem
        ):  # 7x7 stride-2 conv and a max pool: a quarter of the side, as in torchvision
            self.stem = nn.Sequential(conv_bn(3, width, 7, 2), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], width
        for i, n in enumerate(layers):
            w = width * 2**i
            for j in range(n):
                stride = 2 if (j == 0 and i > 0) else 1
                if block == "basic":
                    blocks.append(BasicBlock(cin, w, stride))
                    cin = w
                else:
                    inner = w * 2 if groups > 1 else w  # ResNeXt: wider grouped 3x3
                    blocks.append(Bottleneck(cin, inner, w * 4, stride, groups))
                    cin = w * 4
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet_basic():
    return ResNet("basic", layers=(2, 1), width=8)


def resnet_bottleneck():
    return ResNet("bottleneck", layers=(2, 1), width=8)


def resnext():
    return ResNet("bottleneck", layers=(1, 1), width=8, groups=4)


def resnet50(width=64):
    return ResNet(
        "bottleneck", layers=(3, 4, 6, 3), width=width, num_classes=1000, imagenet_stem=True
    )


def resnet152(width=8):
    return ResNet(
        "bottleneck", layers=(3, 8, 36, 3), width=width, num_classes=10, imagenet_stem=True
    )


# ------------------------------------------------------------------------ MobileNet / EfficientNet


class SqueezeExcite(nn.Module):
    def __init__(self, c, squeeze, act=nn.ReLU, gate=nn.Hardsigmoid):
        super().__init__()
        self.fc1 = nn.Conv2d(c, squeeze, 1)  # biased, no BN: nothing to fold here
        self.act = act()
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.gate = gate()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class InvertedResidual(nn.Module):
    def __init__(
        self,
        cin,
        cout,
        stride,
        expand,
        act=nn.ReLU6,
        se=False,
        se_act=nn.ReLU,
        gate=nn.Hardsigmoid,
        k=3,
    ):
        super().__init__()
        hidden = cin * expand
        layers = []
        if expand != 1:
            layers.append(conv_bn(cin, hidden, 1, act=act))
        layers.append(conv_bn(hidden, hidden, k, stride, groups=hidden, act=act))
        if se:
            layers.append(SqueezeExcite(hidden, max(hidden // 4, 1), se_act, gate))
        layers.append(conv_bn(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV2(nn.Module):
    # (expand, channels, repeats, stride), torchvision's table
    SETTINGS = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]

    def __init__(self, settings=None, stem=32, last=1280, num_classes=1000, width=1.0):
        super().__init__()
        settings = settings or self.SETTINGS
        c = int(stem * width)
        layers = [conv_bn(3, c, 3, 2, act=nn.ReLU6)]
        for t, ch, n, s in settings:
            ch = int(ch * width)
            for i in range(n):
                layers.append(InvertedResidual(c, ch, s if i == 0 else 1, t))
                c = ch
        layers.append(conv_bn(c, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


def mobilenet_v2_block():
    return MobileNetV2([(1, 8, 1, 1), (4, 12, 2, 2)], stem=8, last=32, num_classes=10)


def mobilenet_v2(width=1.0):
    return MobileNetV2(width=width)


def mobilenet_v3_block():
    blocks = [
        conv_bn(3, 8, 3, 2, act=nn.Hardswish),
        InvertedResidual(8, 8, 1, 3, act=nn.Hardswish, se=True),
        InvertedResidual(8, 12, 2, 3, act=nn.Hardswish, se=True, k=5),
    ]
    # the head: a pooled vector through Linear → BN1d → hardswish (one value per channel per sample)
    return nn.Sequential(
        *blocks,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 16),
        nn.BatchNorm1d(16),
        nn.Hardswish(),
        nn.Linear(16, 10),
    )


class StochasticDepth(nn.Module):
    def forward(self, x):
        return x  # eval-mode behaviour


def efficientnet_block():
    class MBConv(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.block = InvertedResidual(
                cin, cout, stride, 4, act=nn.SiLU, se=True, se_act=nn.SiLU, gate=nn.Sigmoid
            )
            self.drop = StochasticDepth()

        def forward(self, x):
            out = self.block.block(x)
            return x + self.drop(out) if self.block.use_res else out

    return nn.Sequential(
        conv_bn(3, 8, 3, 2, act=nn.SiLU),
        MBConv(8, 8, 1),
        MBConv(8, 16, 2),
        conv_bn(16, 32, 1, act=nn.SiLU),
    )


# --------------------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size=2):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)  # concatenation of every earlier output
        x = self.conv1(self.relu1(self.norm1(x)))  # pre-activation: BN → ReLU → Conv
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, n, cin, growth):
        super().__init__(
            {f"denselayer{i + 1}": DenseLayer(cin + i * growth, growth) for i in range(n)}
        )

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    def __init__(self, blocks=(2, 2), growth=4, stem=8, num_classes=10, imagenet_stem=False):
        super().__init__()
        layers = [
            nn.Conv2d(3, stem, 3, 1, 1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
        ]
        if imagenet_stem:
            layers = [
                nn.Conv2d(3, stem, 7, 2, 3, bias=False),
                nn.BatchNorm2d(stem),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            ]
        c = stem
        for i, n in enumerate(blocks):
            layers.append(DenseBlock(n, c, growth))
            c += n * growth
            if i != len(blocks) - 1:
                layers += [
                    nn.BatchNorm2d(c),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(c, c // 2, 1, bias=False),
                    nn.AvgPool2d(2),
                ]
                c //= 2
        layers.append(nn.BatchNorm2d(c))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        x = F.relu(self.features(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def densenet():
    return DenseNet()


def densenet121():
    """DenseNet-121 layout: 121 BN, 62 of them after a concatenation; bottleneck 2·growth."""
    return DenseNet(
        blocks=(6, 12, 24, 16), growth=32, stem=64, num_classes=1000, imagenet_stem=True
    )


# --------------------------------------------------------------------------- RegNet, ShuffleNet


class RegNetBlock(nn.Module):
    """RegNetY block: 1x1 → grouped 3x3 → SE → 1x1, projection shortcut."""

    def __init__(self, cin, cout, stride, group_width=4):
        super().__init__()
        self.a = conv_bn(cin, cout, 1)
        self.b = conv_bn(cout, cout, 3, stride, groups=cout // group_width)
        self.se = SqueezeExcite(cout, max(cin // 4, 1), nn.ReLU, nn.Sigmoid)
        self.c = conv_bn(cout, cout, 1, act=None)
        self.proj = (
            conv_bn(cin, cout, 1, stride, act=None) if (stride != 1 or cin != cout) else None
        )
        self.act = nn.ReLU()

    def forward(self, x):
        shortcut = x if self.proj is None else self.proj(x)
        return self.act(shortcut + self.c(self.se(self.b(self.a(x)))))


def regnet():
    return nn.Sequential(conv_bn(3, 8, 3, 2), RegNetBlock(8, 16, 2), RegNetBlock(16, 16, 1))


def channel_shuffle(x, groups: int):
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        half = cout // 2
        self.stride = stride
        if stride > 1:
            self.branch1 = nn.Sequential(
                conv_bn(cin, cin, 3, stride, groups=cin, act=None), conv_bn(cin, half, 1)
            )
        src = cin if stride > 1 else half
        self.branch2 = nn.Sequential(
            conv_bn(src, half, 1),
            conv_bn(half, half, 3, stride, groups=half, act=None),
            conv_bn(half, half, 1),
        )

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


def shufflenet():
    return nn.Sequential(conv_bn(3, 8, 3, 2), ShuffleUnit(8, 16, 2), ShuffleUnit(16, 16, 1))


# --------------------------------------------------------------------------- GoogLeNet / Inception


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, k, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class InceptionBlock(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch1 = BasicConv2d(cin, 4, 1)
        self.branch2 = nn.Sequential(BasicConv2d(cin, 4, 1), BasicConv2d(4, 6, 3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(cin, 2, 1), BasicConv2d(2, 4, 5, padding=2))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), BasicConv2d(cin, 4, 1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


def inception():
    return nn.Sequential(BasicConv2d(3, 8, 3, padding=1), InceptionBlock(8), InceptionBlock(18))


# --------------------------------------------------------------------------- DCGAN, Conv subclasses


def dcgan_generator(nz=8, ngf=4):
    """ConvTranspose + BN (PyTorch's fuse keeps every one of these BN); one grouped layer."""
    return nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False),
        nn.BatchNorm2d(ngf * 8),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ngf * 4),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, groups=2, bias=True),
        nn.BatchNorm2d(ngf * 2),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, 3, 4, 2, 1, bias=False),
        nn.Tanh(),
    )


class Conv3DSimple(nn.Conv3d):
    """torchvision's R3D-18 builds its convs as subclasses of Conv3d, like this."""

    def __init__(self, cin, cout, stride=1):
        super().__init__(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class Conv1dSame(nn.Conv1d):
    pass


def conv_subclass():
    """R3D-like stem with Conv3d subclasses, then a 1d and a linear head."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(Conv3DSimple(3, 8), nn.BatchNorm3d(8), nn.ReLU(inplace=True))
            self.layer = nn.Sequential(
                Conv3DSimple(8, 8, 2), nn.BatchNorm3d(8), nn.ReLU(inplace=True)
            )
            self.temporal = nn.Sequential(
                Conv1dSame(8, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU()
            )
            self.head = nn.Sequential(
                nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4)
            )

        def forward(self, x):
            x = self.layer(self.stem(x))  # (N, 8, T, H, W)
            x = x.mean(dim=(3, 4))  # (N, 8, T)
            x = self.temporal(x).mean(dim=2)  # (N, 8)
            return self.head(x)

    return Model()


# --------------------------------------------------------------------------- the table

# name -> (builder, input shape, BN folded into a conv/linear, BN left as a frozen affine)
REPLICAS = {
    "resnet_basic": (resnet_basic, (2, 3, 16, 16), 8, 0),
    "resnet_bottleneck": (resnet_bottleneck, (2, 3, 16, 16), 12, 0),
    "resnext": (resnext, (2, 3, 16, 16), 9, 0),
    "mobilenet_v2": (mobilenet_v2_block, (2, 3, 16, 16), 10, 0),
    "mobilenet_v3": (mobilenet_v3_block, (2, 3, 16, 16), 8, 0),
    "efficientnet": (efficientnet_block, (2, 3, 16, 16), 8, 0),
    "densenet": (densenet, (2, 3, 16, 16), 7, 4),
    "regnet": (regnet, (2, 3, 16, 16), 8, 0),
    "shufflenet": (shufflenet, (2, 3, 16, 16), 9, 0),
    "inception": (inception, (2, 3, 16, 16), 13, 0),
    "dcgan": (dcgan_generator, (2, 8, 1, 1), 3, 0),
    "conv_subclass": (conv_subclass, (2, 3, 4, 8, 8), 4, 0),
}


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN running stats and affine parameters far from the identity; returns model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) or hasattr(m, "running_var"):
                c = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                    m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.randn(c, generator=g) * 0.5 + 1)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return model


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A replica with random BN statistics and a matching random input."""
    builder, shape, _, _ = REPLICAS[name]
    torch.manual_seed(seed)
    model = randomize_bn(builder(), seed)
    return model, torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1))
