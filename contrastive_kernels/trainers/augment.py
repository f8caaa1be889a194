"""Batched augmentations in plain torch, on the training device (no torchvision, no workers).

Every random number comes from one torch.Generator, drawn in a fixed order, so that a run is
reproducible from its seed and a resumed run continues the same stream. Each image of the
batch gets its own parameters:

    geometry    random resized crop + rotation + shear + optional flip, as one affine map
                sampled with grid_sample (bilinear), output out_size x out_size
    intensity   brightness, contrast, saturation and hue jitter (with probability jitter_p)
    grayscale   (with probability grayscale_p, colour images only)
    blur        Gaussian, sigma uniform in blur_sigma (with probability blur_p)
    noise       additive Gaussian, std uniform in [0, noise_std] (with probability noise_p)

then normalisation by the training set's channel mean and std.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentRecipe:
    out_size: int
    crop_scale: tuple = (0.2, 1.0)  # area fraction of the crop
    crop_ratio: tuple = (3 / 4, 4 / 3)
    rotation: float = 0.0  # degrees, uniform in [-rotation, rotation]
    shear: float = 0.0  # degrees
    flip: bool = True
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1  # fraction of a full turn
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)  # pixels of the output
    noise_p: float = 0.0
    noise_std: float = 0.0


RECIPES = {
    # 8x8 digits, drawn at 16x16: no flips (a mirrored 2 is not a 2), small rotations and shears,
    # and blur + noise in place of colour.
    "digits": AugmentRecipe(out_size=16, crop_scale=(0.4, 1.0), rotation=15.0, shear=10.0, flip=False,
                            saturation=0.0, hue=0.0, grayscale_p=0.0, blur_p=0.5, blur_sigma=(0.1, 1.0),
                            noise_p=0.5, noise_std=0.1),
    # Photographs (CIFAR-10, image folders): SimCLR's CIFAR recipe (no blur at 32 pixels).
    "natural": AugmentRecipe(out_size=32),
}


def to_unit(images):
    """uint8 0..255 -> float32 0..1 on the images' device."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images.float()


def normalize(x, mean, std):
    return (x - mean.view(1, -1, 1, 1).to(x.device)) / std.view(1, -1, 1, 1).to(x.device)


def prepare_eval(images, recipe, mean, std):
    """The un-augmented view the encoder is evaluated on: resized to out_size, normalised."""
    x = to_unit(images)
    if x.shape[-1] != recipe.out_size or x.shape[-2] != recipe.out_size:
        x = F.interpolate(x, size=(recipe.out_size, recipe.out_size), mode="bilinear", align_corners=False)
    return normalize(x, mean, std)


def _uniform(generator, batch, low, high, device):
    return low + (high - low) * torch.rand(batch, generator=generator, device=device)


def _geometry(x, recipe, generator):
    batch, device = x.shape[0], x.device
    area = _uniform(generator, batch, *recipe.crop_scale, device)
    log_ratio = _uniform(generator, batch, math.log(recipe.crop_ratio[0]), math.log(recipe.crop_ratio[1]), device)
    width = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # half-extent in [-1, 1] coordinates
    height = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    centre_x = _uniform(generator, batch, -1.0, 1.0, device) * (1 - width)
    centre_y = _uniform(generator, batch, -1.0, 1.0, device) * (1 - height)
    angle = _uniform(generator, batch, -recipe.rotation, recipe.rotation, device).deg2rad()
    shear = _uniform(generator, batch, -recipe.shear, recipe.shear, device).deg2rad().tan()
    flip = torch.rand(batch, generator=generator, device=device) < (0.5 if recipe.flip else 0.0)
    cos, sin = angle.cos(), angle.sin()
    # input = diag(width, height) @ rotation @ shear @ flip @ output + centre
    mirror = 1.0 - 2.0 * flip.float()
    a00, a01 = cos * mirror, cos * shear - sin
    a10, a11 = sin * mirror, sin * shear + cos
    theta = torch.stack([torch.stack([width * a00, width * a01, centre_x], 1),
                         torch.stack([height * a10, height * a11, centre_y], 1)], 1)
    grid = F.affine_grid(theta, [batch, x.shape[1], recipe.out_size, recipe.out_size], align_corners=False)
    # "border" as F.interpolate in prepare_eval: with "zeros" an upsampled view's outer ring
    # would blend in black (its pixel centres lie half an input pixel outside the image).
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x):
    if x.shape[1] != 3:
        return x.mean(dim=1, keepdim=True)
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _rotate_hue(x, turns):
    """Rotate the chroma plane of YIQ by `turns` of a full circle (per image)."""
    to_yiq = x.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
    angle = (2 * math.pi * turns).view(-1, 1, 1)
    cos, sin = angle.cos(), angle.sin()
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], 1)
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_yiq), yiq)


def _intensity(x, recipe, generator):
    batch, device = x.shape[0], x.device
    apply = (torch.rand(batch, generator=generator, device=device) < recipe.jitter_p).float()
    factor = lambda amount: (1 + apply * _uniform(generator, batch, -amount, amount, device)).view(-1, 1, 1, 1)
    brightness, contrast = factor(recipe.brightness), factor(recipe.contrast)
    saturation, hue = factor(recipe.saturation), apply * _uniform(generator, batch, -recipe.hue, recipe.hue, device)
    x = (x * brightness).clamp(0, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean).clamp(0, 1)
    if x.shape[1] == 3:
        gray = _gray(x)
        x = ((x - gray) * saturation + gray).clamp(0, 1)
        if recipe.hue > 0:
            x = _rotate_hue(x, hue).clamp(0, 1)
        to_gray = (torch.rand(batch, generator=generator, device=device) < recipe.grayscale_p).view(-1, 1, 1, 1)
        x = torch.where(to_gray, _gray(x).expand_as(x), x)
    return x


def _blur(x, recipe, generator):
    batch, channels, device = x.shape[0], x.shape[1], x.device
    apply = torch.rand(batch, generator=generator, device=device) < recipe.blur_p
    sigma = _uniform(generator, batch, *recipe.blur_sigma, device)
    radius = max(1, math.ceil(2 * recipe.blur_sigma[1]))
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=x.dtype)
    taps = torch.exp(-offsets.view(1, -1) ** 2 / (2 * sigma.view(-1, 1) ** 2))
    taps = taps / taps.sum(1, keepdim=True)
    identity = (offsets == 0).to(x.dtype).expand_as(taps)
    taps = torch.where(apply.view(-1, 1), taps, identity).repeat_interleave(channels, 0)
    # One grouped convolution per axis: every (image, channel) plane has its own kernel.
    planes = F.pad(x.reshape(1, batch * channels, *x.shape[2:]), (radius, radius, radius, radius), mode="reflect")
    planes = F.conv2d(planes, taps.view(-1, 1, 1, 2 * radius + 1), groups=batch * channels)
    planes = F.conv2d(planes, taps.view(-1, 1, 2 * radius + 1, 1), groups=batch * channels)
    return planes.view_as(x)


def _noise(x, recipe, generator):
    batch, device = x.shape[0], x.device
    apply = (torch.rand(batch, generator=generator, device=device) < recipe.noise_p).float()
    std = (apply * _uniform(generator, batch, 0.0, recipe.noise_std, device)).view(-1, 1, 1, 1)
    return (x + std * torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)).clamp(0, 1)


@torch.no_grad()
def augment(images, recipe, mean, std, generator):
    """One random view of each image: uint8 or [0, 1] float (B, C, H, W) -> normalised float32
    (B, C, out_size, out_size). `generator` lives on the images' device."""
    x = _geometry(to_unit(images), recipe, generator)
    x = _intensity(x, recipe, generator)
    if recipe.blur_p > 0:
        x = _blur(x, recipe, generator)
    if recipe.noise_p > 0:
        x = _noise(x, recipe, generator)
    return normalize(x, mean, std)
