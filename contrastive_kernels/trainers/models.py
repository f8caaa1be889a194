"""The default encoder (a small ResNet for 32x32-class inputs) and the projection head."""
import torch
from torch import nn


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with a residual; a 1x1 projection when the shape changes."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet (3x3 stem, no max-pool, one stride-2 step per later stage) that ends
    in global average pooling, so any input size of 8 pixels or more works. With the default
    widths (32, 64, 128) and one block per stage it has 0.7M parameters; `feature_dim` is the
    last width."""

    def __init__(self, in_channels=3, widths=(32, 64, 128), blocks_per_stage=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        layers, channels = [], widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks_per_stage):
                layers.append(BasicBlock(channels, width, 2 if stage > 0 and block == 0 else 1))
                channels = width
        self.layers = nn.Sequential(*layers)
        self.feature_dim = channels

    def forward(self, x):
        return self.layers(self.stem(x)).mean(dim=(2, 3))


def projection_head(in_dim, hidden_dim, out_dim):
    """SimCLR's / MoCo v2's MLP head: Linear -> BatchNorm -> ReLU -> Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


@torch.no_grad()
def feature_dim(encoder, example):
    """The width of encoder(example) for one example image (C, H, W), found by running it."""
    was_training = encoder.training
    encoder.eval()
    out = encoder(example.unsqueeze(0))
    encoder.train(was_training)
    if out.dim() != 2:
        raise ValueError(f"the encoder must return (batch, features), got shape {tuple(out.shape)}")
    return out.shape[1]
