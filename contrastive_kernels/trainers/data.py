"""Data sets for the trainers, loaded whole into memory: no downloads, no DataLoader workers.

Specs: `digits` (scikit-learn's 1,797 handwritten 8x8 digits, shipped in this package),
`cifar10:<dir>` (the python pickle batches of CIFAR-10) and `folder:<dir>` (one sub-folder
per class; images directly in <dir> when there are no labels). Each has a fixed train /
held-out split that does not depend on the training seed, so kNN numbers compare across runs.
"""
import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DIGITS_FILE = Path(__file__).resolve().parent / "data" / "digits.csv.gz"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_SEED = 0  # the held-out split is part of the data set, not of the run


@dataclass
class ImageDataset:
    """Images as (N, C, H, W) uint8 tensors (0..255), labels as int64 or None when unlabelled."""
    name: str
    recipe: str  # the augmentation recipe in augment.RECIPES
    train_images: torch.Tensor
    train_labels: torch.Tensor | None
    heldout_images: torch.Tensor
    heldout_labels: torch.Tensor | None

    @property
    def channels(self):
        return self.train_images.shape[1]

    def channel_stats(self):
        """Per-channel mean and std of the training images in [0, 1], for input normalisation."""
        pixels = self.train_images.double().div_(255).transpose(0, 1).reshape(self.channels, -1)
        return pixels.mean(1).float(), pixels.std(1).float().clamp_min(1e-3)

    def __repr__(self):
        return (f"ImageDataset({self.name}: {len(self.train_images)} train / {len(self.heldout_images)} held-out "
                f"images of {tuple(self.train_images.shape[1:])}, "
                f"{'labelled' if self.train_labels is not None else 'unlabelled'})")


def load_dataset(spec):
    """`digits`, `cifar10:<dir>` or `folder:<dir>` -> ImageDataset; ValueError for a bad spec."""
    if not isinstance(spec, str):
        raise TypeError(f"data must be a spec string, got {type(spec).__name__}")
    kind, _, path = spec.partition(":")
    if kind == "digits" and not path:
        return load_digits()
    if kind in ("cifar10", "folder"):
        if not path:
            raise ValueError(f"data spec {spec!r} needs a directory: {kind}:<dir>")
        if not os.path.isdir(path):
            raise ValueError(f"data directory {path!r} (from {spec!r}) does not exist")
        return load_cifar10(path) if kind == "cifar10" else load_folder(path)
    raise ValueError(f"unknown data spec {spec!r}: use digits, cifar10:<dir> or folder:<dir>")


def _split(labels_or_count, heldout_fraction):
    """Fixed train / held-out indices: stratified by class when labelled."""
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    if isinstance(labels_or_count, int):
        order = torch.randperm(labels_or_count, generator=generator)
        cut = int(round(labels_or_count * heldout_fraction))
        return order[cut:].sort().values, order[:cut].sort().values
    train, heldout = [], []
    for label in labels_or_count.unique():
        members = (labels_or_count == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut = int(round(len(members) * heldout_fraction))
        heldout.append(members[:cut])
        train.append(members[cut:])
    return torch.cat(train).sort().values, torch.cat(heldout).sort().values


def _labelled(name, recipe, images, labels, heldout_fraction):
    train, heldout = _split(labels if labels is not None else len(images), heldout_fraction)
    pick = lambda t, idx: None if t is None else t[idx]
    return ImageDataset(name, recipe, images[train], pick(labels, train), images[heldout], pick(labels, heldout))


def load_digits():
    """The 1,797 8x8 digits, pixel values 0..16 scaled to 0..255; 25% held out (450 images)."""
    with gzip.open(DIGITS_FILE, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    pixels = torch.from_numpy(table[:, :64]).reshape(-1, 1, 8, 8)
    images = (pixels * 255 + 8).div(16, rounding_mode="floor").to(torch.uint8)  # 16 -> 255
    return _labelled("digits", "digits", images, torch.from_numpy(table[:, 64]), 0.25)


def load_cifar10(directory):
    """CIFAR-10's python batches (data_batch_1..5 train, test_batch held out) from `directory`
    or its `cifar-10-batches-py` sub-folder."""
    root = Path(directory)
    if not (root / "test_batch").exists() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"

    def read(names):
        images, labels = [], []
        for name in names:
            file = root / name
            if not file.exists():
                raise ValueError(f"{directory!r} is not a CIFAR-10 python folder: {name} is missing")
            with open(file, "rb") as handle:
                batch = pickle.load(handle, encoding="bytes")
            images.append(torch.from_numpy(np.asarray(batch[b"data"], dtype=np.uint8)).reshape(-1, 3, 32, 32))
            labels.append(torch.as_tensor(batch[b"labels"], dtype=torch.int64))
        return torch.cat(images), torch.cat(labels)

    train_images, train_labels = read([f"data_batch_{i}" for i in range(1, 6)])
    heldout_images, heldout_labels = read(["test_batch"])
    return ImageDataset("cifar10", "natural", train_images, train_labels, heldout_images, heldout_labels)


def load_folder(directory, image_size=32):
    """Every image under `directory`: class sub-folders give labels (sorted names -> 0, 1, ...);
    images directly in it are unlabelled. Resized (shorter side) and centre-cropped to
    image_size, RGB; 20% held out."""
    from PIL import Image

    root = Path(directory)
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if classes:
        files = [(f, label) for label, folder in enumerate(classes) for f in sorted(folder.iterdir())
                 if f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = [(f, None) for f in sorted(root.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {directory!r}")
    images = []
    for file, _ in files:
        with Image.open(file) as image:
            image = image.convert("RGB")
            scale = image_size / min(image.size)
            size = (max(image_size, round(image.width * scale)), max(image_size, round(image.height * scale)))
            image = image.resize(size, Image.BILINEAR)
            left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
            image = image.crop((left, top, left + image_size, top + image_size))
            images.append(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1))
    labels = torch.tensor([label for _, label in files]) if classes else None
    return _labelled(f"folder:{root.name}", "natural", torch.stack(images), labels, 0.2)
