"""The trainers' data side: data sets (digits, CIFAR-10 pickles, image folders), the batched
augmentations and the kNN / linear-probe evaluation, each against expectations computed here
independently (raw CSV, hand-written pickles and PNGs, numpy, hand-worked votes)."""
import csv
import gzip
import math
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from contrastive_kernels.trainers import augment as aug
from contrastive_kernels.trainers import data, knn
from contrastive_kernels.trainers.augment import AugmentRecipe, RECIPES, prepare_eval
from contrastive_kernels.trainers.data import ImageDataset, load_dataset
from helpers import assert_close

# A recipe that draws random numbers but whose every draw is a no-op: identity geometry, no
# jitter (jitter_p=0 even though the default amounts are non-zero), no grayscale, blur or noise.
STILL = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), rotation=0.0, shear=0.0, flip=False,
             jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, noise_p=0.0)


# Colour views pass through the no-op hue turn (RGB -> YIQ -> RGB in float32), which moves
# values by up to ~1e-6; the differences the tests look for are >= 1e-3.
ROUND = 1e-5


def still(out_size, **changes):
    return AugmentRecipe(out_size=out_size, **{**STILL, **changes})


def unit_stats(channels):
    """mean 0, std 1: augment's output is then the [0, 1] image itself."""
    return torch.zeros(channels), torch.ones(channels)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def random_images(shape, seed=0):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen(seed))


# ----------------------------------------------------------------------------------- digits

def raw_digits():
    """The shipped CSV read with csv (not the loader's numpy path): (1797, 64) ints, labels."""
    with gzip.open(data.DIGITS_FILE, "rt", newline="") as handle:
        rows = [[int(v) for v in row] for row in csv.reader(handle) if row]
    table = np.array(rows, dtype=np.int64)
    return table[:, :64], table[:, 64]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def digits_raw():
    return raw_digits()


def test_digits_images_and_labels(digits, digits_raw):
    """1797 images of (1, 8, 8) uint8; 0..16 is stretched to 0..255 so that 16 is full white."""
    pixels, labels = digits_raw
    assert pixels.shape == (1797, 64) and pixels.min() == 0 and pixels.max() == 16
    assert len(digits.train_images) + len(digits.heldout_images) == 1797
    for images, lab in [(digits.train_images, digits.train_labels), (digits.heldout_images, digits.heldout_labels)]:
        assert images.dtype == torch.uint8 and images.shape[1:] == (1, 8, 8)
        assert lab.dtype == torch.int64 and lab.shape == (len(images),)
    everything = torch.cat([digits.train_images, digits.heldout_images])
    assert int(everything.max()) == 255 and int(everything.min()) == 0
    assert sorted(torch.cat([digits.train_labels, digits.heldout_labels]).unique().tolist()) == list(range(10))
    assert digits.channels == 1 and digits.name == "digits" and digits.recipe in RECIPES
    # The mapping at the anchors, worked by hand: 0 -> 0, 8 -> (2040 + 8) // 16 = 128, 16 -> 255.
    assert [(v * 255 + 8) // 16 for v in (0, 8, 16)] == [0, 128, 255]


def test_digits_pixels_match_the_raw_csv(digits, digits_raw):
    """Every held image is a CSV row (row-major 8x8) under v -> (v*255+8)//16, with its label;
    train and held-out are disjoint and together are all 1797 rows. (All rows are distinct.)"""
    pixels, labels = digits_raw
    expected = ((pixels * 255 + 8) // 16).astype(np.uint8)
    row_of = {row.tobytes(): i for i, row in enumerate(expected)}
    assert len(row_of) == 1797, "the CSV has duplicate images; the matching below assumes none"

    def rows(images, lab):
        flat = images.reshape(len(images), 64).numpy()
        found = [row_of.get(r.tobytes()) for r in flat]
        assert None not in found, "an image matches no CSV row (wrong mapping or layout)"
        assert (labels[found] == lab.numpy()).all(), "labels do not follow their images"
        return found

    train, heldout = rows(digits.train_images, digits.train_labels), rows(digits.heldout_images, digits.heldout_labels)
    assert len(train) == 1347 and len(heldout) == 450
    assert not set(train) & set(heldout)
    assert set(train) | set(heldout) == set(range(1797))
    # One pixel spelled out: row r, pixel (y=2, x=3) is CSV column 2*8+3 = 19.
    r = train[5]
    assert int(digits.train_images[5, 0, 2, 3]) == (int(pixels[r, 19]) * 255 + 8) // 16


def test_digits_split_is_stratified(digits, digits_raw):
    """Each class puts 25% of its images in held-out, within one image."""
    _, labels = digits_raw
    total, held = Counter(labels.tolist()), Counter(digits.heldout_labels.tolist())
    for c in range(10):
        assert abs(held[c] - 0.25 * total[c]) <= 1, (c, held[c], total[c])


def test_digits_split_is_fixed_whatever_the_global_seed(digits):
    """The split is part of the data set: a load after another torch.manual_seed is identical."""
    torch.manual_seed(1)
    first = load_dataset("digits")
    torch.manual_seed(987654)
    torch.rand(17)
    second = load_dataset("digits")
    for a, b, c in [(first.train_images, second.train_images, digits.train_images),
                    (first.heldout_images, second.heldout_images, digits.heldout_images),
                    (first.train_labels, second.train_labels, digits.train_labels),
                    (first.heldout_labels, second.heldout_labels, digits.heldout_labels)]:
        assert torch.equal(a, b) and torch.equal(a, c)


# ----------------------------------------------------------------------------------- cifar10

BATCH_SIZES = {"data_batch_1": 2, "data_batch_2": 3, "data_batch_3": 1, "data_batch_4": 2, "data_batch_5": 2,
               "test_batch": 3}


def write_fake_cifar(folder):
    """CIFAR-10's python layout: pickled dicts with b"data" (n, 3072) uint8 (1024 red, then 1024
    green, then 1024 blue, each row-major 32x32) and b"labels" (a list). Returns the rows and
    labels written, by file. Row 0 of data_batch_1 is pure (255, 0, 128) so a channel mix-up shows."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    written = {}
    for name, n in BATCH_SIZES.items():
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        if name == "data_batch_1":
            rows[0] = np.repeat(np.array([255, 0, 128], dtype=np.uint8), 1024)
        labels = rng.integers(0, 10, n).tolist()
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": rows,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
        written[name] = (rows, labels)
    return written


def expected_cifar_images(rows):
    """pixel [c, y, x] = row[c*1024 + y*32 + x], by explicit index arithmetic."""
    c, y, x = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    return rows[:, c * 1024 + y * 32 + x]


def check_cifar(ds, written):
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    train_rows = np.concatenate([written[n][0] for n in train_names])
    train_labels = sum((written[n][1] for n in train_names), [])
    assert ds.train_images.shape == (10, 3, 32, 32) and ds.train_images.dtype == torch.uint8
    assert ds.heldout_images.shape == (3, 3, 32, 32) and ds.heldout_images.dtype == torch.uint8
    assert (ds.train_images.numpy() == expected_cifar_images(train_rows)).all()
    assert (ds.heldout_images.numpy() == expected_cifar_images(written["test_batch"][0])).all()
    assert ds.train_labels.dtype == torch.int64 and ds.train_labels.tolist() == train_labels
    assert ds.heldout_labels.dtype == torch.int64 and ds.heldout_labels.tolist() == written["test_batch"][1]
    red, green, blue = ds.train_images[0]
    assert (red == 255).all() and (green == 0).all() and (blue == 128).all()
    assert ds.channels == 3 and ds.recipe in RECIPES


def test_cifar10_folder(tmp_path):
    """Train = data_batch_1..5 in order, held-out = test_batch, channel-major pixels."""
    written = write_fake_cifar(tmp_path / "c")
    check_cifar(load_dataset(f"cifar10:{tmp_path / 'c'}"), written)


def test_cifar10_batches_py_subfolder(tmp_path):
    """The archive's own `cifar-10-batches-py` folder is found from its parent."""
    written = write_fake_cifar(tmp_path / "cifar-10-batches-py")
    check_cifar(load_dataset(f"cifar10:{tmp_path}"), written)


@pytest.mark.parametrize("missing", ["data_batch_3", "test_batch"])
def test_cifar10_missing_batch_names_the_file(tmp_path, missing):
    write_fake_cifar(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(ValueError, match=missing):
        load_dataset(f"cifar10:{tmp_path}")


# ----------------------------------------------------------------------------------- folder

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def three_bands(size, horizontal, middle):
    """Bands red | middle | blue along the long side, the middle one covering the centre crop."""
    w, h = size
    image = np.zeros((h, w, 3), dtype=np.uint8)
    if horizontal:  # w = 2h: the centre crop keeps columns [w/4, 3w/4) of the original
        image[:, : w // 5], image[:, w // 5: 4 * w // 5], image[:, 4 * w // 5:] = RED, middle, BLUE
    else:
        image[: h // 5], image[h // 5: 4 * h // 5], image[4 * h // 5:] = RED, middle, BLUE
    return Image.fromarray(image)


def write_class_folder(root):
    """Three classes created out of sorted order, five images each (one held out per class),
    sizes other than 32, a non-square pair, an 'L' and an 'RGBA' image, plus non-image files.
    Returns {centre colour: (label, colour every pixel must have or None)}; centres are unique."""
    expect = {}

    def save(cls, name, image, label, solid):
        (root / cls).mkdir(parents=True, exist_ok=True)
        image.save(root / cls / name)
        centre = tuple(np.asarray(image.convert("RGB"))[image.height // 2, image.width // 2].tolist())
        assert centre not in expect
        expect[centre] = (label, solid)

    # 'cat' first on disk, but labels follow sorted names: ant=0, bird=1, cat=2.
    for i, (size, colour) in enumerate([((48, 48), (10, 20, 30)), ((16, 16), (40, 50, 60)),
                                        ((33, 33), (70, 80, 90)), ((100, 100), (1, 2, 3)), ((7, 7), (200, 1, 2))]):
        save("cat", f"c{i}.png", Image.new("RGB", size, colour), 2, colour)
    save("ant", "a0.png", Image.new("RGB", (48, 48), (12, 200, 31)), 0, (12, 200, 31))
    save("ant", "a1.png", three_bands((80, 40), True, (0, 250, 0)), 0, (0, 250, 0))  # wide
    save("ant", "a2.png", three_bands((40, 80), False, (0, 0, 200)), 0, (0, 0, 200))  # tall
    save("ant", "a3.png", Image.new("L", (20, 20), 77), 0, (77, 77, 77))
    save("ant", "a4.PNG", Image.new("RGBA", (64, 64), (200, 100, 50, 255)), 0, (200, 100, 50))
    for i, colour in enumerate([(3, 3, 250), (100, 0, 100), (0, 100, 100), (128, 128, 0)]):
        save("bird", f"b{i}.png", Image.new("RGB", (40 + i, 40 + i), colour), 1, colour)
    # Orientation: a 32x32 (no resize) black image with one red pixel at x=5, y=1.
    marker = np.zeros((32, 32, 3), dtype=np.uint8)
    marker[1, 5] = RED
    save("bird", "b4.png", Image.fromarray(marker), 1, None)
    for junk in ["notes.txt", "ant/readme.md", "bird/labels.csv", "cat/.DS_Store"]:
        (root / junk).write_text("not an image")
    return expect


def test_folder_with_classes(tmp_path):
    expect = write_class_folder(tmp_path / "imgs")
    ds = load_dataset(f"folder:{tmp_path / 'imgs'}")
    assert ds.recipe in RECIPES and ds.channels == 3
    assert ds.train_images.shape == (12, 3, 32, 32) and ds.heldout_images.shape == (3, 3, 32, 32)
    assert ds.train_images.dtype == torch.uint8 and ds.heldout_images.dtype == torch.uint8
    assert ds.train_labels.dtype == torch.int64 and ds.heldout_labels.dtype == torch.int64
    assert sorted(ds.heldout_labels.tolist()) == [0, 1, 2]  # 20% of each class of five
    seen = set()
    for images, labels in [(ds.train_images, ds.train_labels), (ds.heldout_images, ds.heldout_labels)]:
        for image, label in zip(images, labels.tolist()):
            centre = tuple(image[:, 16, 16].tolist())
            assert centre in expect, f"unexpected centre colour {centre}"
            want_label, solid = expect[centre]
            assert label == want_label, (centre, label, want_label)
            if solid is not None:  # solid and band images: colour kept, and no band in the crop
                assert (image == torch.tensor(solid, dtype=torch.uint8).view(3, 1, 1)).all(), centre
            else:
                assert image[:, 1, 5].tolist() == list(RED) and int(image.sum()) == 255
            seen.add(centre)
    assert seen == set(expect), "some images missing or loaded twice"


def test_folder_without_classes_is_unlabelled(tmp_path):
    for i in range(5):
        Image.new("RGB", (24 + i, 40), (i, 2 * i, 3 * i)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.train_labels is None and ds.heldout_labels is None
    assert ds.train_images.shape == (4, 3, 32, 32) and ds.heldout_images.shape == (1, 3, 32, 32)
    colours = {tuple(im[:, 0, 0].tolist()) for im in torch.cat([ds.train_images, ds.heldout_images])}
    assert colours == {(i, 2 * i, 3 * i) for i in range(5)}


@pytest.mark.parametrize("layout", ["empty", "only_text", "empty_class_folders"])
def test_folder_without_images_is_an_error(tmp_path, layout):
    if layout == "only_text":
        (tmp_path / "a.txt").write_text("x")
    if layout == "empty_class_folders":
        (tmp_path / "cats").mkdir()
        (tmp_path / "dogs").mkdir()
        (tmp_path / "dogs" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        load_dataset(f"folder:{tmp_path}")


# ----------------------------------------------------------------------------------- specs

@pytest.mark.parametrize("spec,match", [("mnist", "unknown data spec"), ("digits:x", "unknown data spec"),
                                        ("", "unknown data spec"), ("cifar10:", "needs a directory"),
                                        ("folder:", "needs a directory"),
                                        ("cifar10:/no/such/dir/anywhere", "does not exist"),
                                        ("folder:/no/such/dir/anywhere", "does not exist")])
def test_bad_specs_are_value_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        load_dataset(spec)


def test_a_file_is_not_a_directory(tmp_path):
    (tmp_path / "f.png").write_bytes(b"")
    with pytest.raises(ValueError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'f.png'}")


@pytest.mark.parametrize("spec", [None, 3, Path("digits"), b"digits"])
def test_non_string_spec_is_a_type_error(spec):
    with pytest.raises(TypeError):
        load_dataset(spec)


# ----------------------------------------------------------------------------------- channel_stats

def numpy_stats(images):
    x = images.numpy().astype(np.float64) / 255
    x = x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1)
    return x.mean(1), x.std(1, ddof=1)


def test_channel_stats_digits(digits):
    mean, std = digits.channel_stats()
    want_mean, want_std = numpy_stats(digits.train_images)
    assert mean.shape == (1,) and mean.dtype == torch.float32
    assert_close(mean, torch.from_numpy(want_mean), rtol=1e-6, name="mean")
    assert_close(std, torch.from_numpy(want_std), rtol=1e-5, name="std")


def test_channel_stats_per_channel(tmp_path):
    """Three channels with different statistics; held-out images must not count."""
    write_fake_cifar(tmp_path)
    ds = load_dataset(f"cifar10:{tmp_path}")
    ds.train_images[:, 1] //= 4  # green darker: a channel mix-up would show
    ds.heldout_images.fill_(255)
    mean, std = ds.channel_stats()
    want_mean, want_std = numpy_stats(ds.train_images)
    assert_close(mean, torch.from_numpy(want_mean), rtol=1e-6, name="mean")
    assert_close(std, torch.from_numpy(want_std), rtol=1e-4, name="std")  # either ddof passes


def test_channel_stats_of_a_constant_channel_is_positive():
    """A flat channel must not give std 0 (normalisation divides by it)."""
    images = torch.full((4, 2, 3, 3), 7, dtype=torch.uint8)
    images[:, 1] = random_images((4, 3, 3))
    ds = ImageDataset("t", "natural", images, None, images[:1], None)
    mean, std = ds.channel_stats()
    assert_close(mean[:1], torch.tensor([7 / 255]), rtol=1e-6)
    assert 0 < float(std[0]) <= 1e-3 + 1e-9 and float(std[1]) > 0.05


# ----------------------------------------------------------------------------------- augment

@pytest.mark.parametrize("recipe,shape", [("digits", (5, 1, 8, 8)), ("natural", (5, 3, 32, 32)),
                                          ("natural", (3, 3, 40, 40))])
def test_augment_shape_dtype_finite(recipe, shape):
    r = RECIPES[recipe]
    out = aug.augment(random_images(shape), r, torch.full((shape[1],), 0.4), torch.full((shape[1],), 0.2), gen())
    assert out.shape == (shape[0], shape[1], r.out_size, r.out_size) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("recipe,shape", [("digits", (4, 1, 8, 8)), ("natural", (4, 3, 32, 32))])
def test_augment_is_reproducible_from_the_seed(recipe, shape):
    """Same seed -> same views; another seed, or the next call on the same stream, differs."""
    images, (mean, std) = random_images(shape), unit_stats(shape[1])
    g = gen(3)
    a = aug.augment(images, RECIPES[recipe], mean, std, g)
    a_next = aug.augment(images, RECIPES[recipe], mean, std, g)
    b = aug.augment(images, RECIPES[recipe], mean, std, gen(3))
    c = aug.augment(images, RECIPES[recipe], mean, std, gen(4))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.05 and (a - a_next).abs().max() > 0.05


def test_augment_leaves_the_global_rng_alone():
    """All randomness comes from the given generator."""
    recipe = AugmentRecipe(out_size=16, rotation=10, shear=5, grayscale_p=0.5, blur_p=0.5, noise_p=0.5,
                           noise_std=0.1)
    state = torch.get_rng_state()
    aug.augment(random_images((4, 3, 12, 12)), recipe, *unit_stats(3), gen())
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("channels,size,out", [(3, 32, 32), (1, 32, 32), (3, 64, 32), (3, 40, 32)])
def test_still_recipe_equals_prepare_eval(channels, size, out):
    """With every random draw a no-op, a training view is the evaluation view."""
    images = random_images((4, channels, size, size))
    mean, std = torch.rand(channels, generator=gen(1)), 0.2 + torch.rand(channels, generator=gen(2))
    got = aug.augment(images, still(out), mean, std, gen())
    assert_close(got, prepare_eval(images, still(out), mean, std), rtol=0, atol=2 * ROUND)


def test_still_recipe_equals_prepare_eval_when_upsampling_digits():
    """Up to the border: grid_sample pads like F.interpolate clamps (it once blended in black)."""
    images = random_images((4, 1, 8, 8))
    mean, std = unit_stats(1)
    got = aug.augment(images, still(16), mean, std, gen())
    assert_close(got, prepare_eval(images, still(16), mean, std), rtol=0, atol=2e-6)


def test_prepare_eval_is_bilinear_resize_and_normalisation():
    """prepare_eval against F.interpolate and a numpy normalisation; no resize at out_size."""
    images = random_images((3, 3, 20, 20))
    mean, std = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.5, 0.25, 2.0])
    x = images.numpy().astype(np.float64) / 255
    m, s = mean.double().numpy().reshape(1, 3, 1, 1), std.double().numpy().reshape(1, 3, 1, 1)
    same = prepare_eval(images, still(20), mean, std)
    assert_close(same, torch.from_numpy((x - m) / s), rtol=0, atol=1e-5)
    resized = F.interpolate(torch.from_numpy(x), size=(12, 12), mode="bilinear", align_corners=False)
    assert_close(prepare_eval(images, still(12), mean, std), (resized - torch.from_numpy(m)) / torch.from_numpy(s),
                 rtol=0, atol=1e-5)


def test_augment_normalises_with_the_given_mean_and_std():
    images = random_images((3, 3, 16, 16))
    mean, std = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.5, 0.25, 2.0])
    x = images.numpy().astype(np.float64) / 255
    want = (x - mean.double().numpy().reshape(1, 3, 1, 1)) / std.double().numpy().reshape(1, 3, 1, 1)
    assert_close(aug.augment(images, still(16), mean, std, gen()), torch.from_numpy(want), rtol=0, atol=1e-5)


def test_augment_accepts_unit_floats_like_uint8():
    """uint8 0..255 and float 0..1 inputs are the same images."""
    images = random_images((4, 3, 16, 16))
    mean, std = unit_stats(3)
    a = aug.augment(images, RECIPES["natural"], mean, std, gen(5))
    b = aug.augment(images.float() / 255, RECIPES["natural"], mean, std, gen(5))
    assert_close(a, b, rtol=0, atol=1e-5)


def test_flip_mirrors_some_images_exactly():
    """flip=True alone: each view is the image or its exact mirror, and both occur."""
    images = random_images((64, 3, 16, 16))
    mean, std = unit_stats(3)
    out = aug.augment(images, still(16, flip=True), mean, std, gen())
    plain = images.float() / 255
    same = ((out - plain).abs().amax((1, 2, 3)) < ROUND)
    mirrored = ((out - plain.flip(-1)).abs().amax((1, 2, 3)) < ROUND)
    assert bool((same | mirrored).all())
    assert 10 <= int(mirrored.sum()) <= 54 and int(same.sum()) + int(mirrored.sum()) == 64


@pytest.mark.parametrize("kind", ["rotation", "shear"])
def test_rotation_and_shear_on_ramps(kind):
    """Channel 0 ramps along x, channel 1 along y. Bilinear sampling keeps ramps linear, so the
    fitted gradients of the centre of each view are the rows of the 2x2 map from output to input
    pixels: a rotation (orthogonal, det +1, angle within +-rotation) or an x-shear [[1, t], [0, 1]]
    with |t| <= tan(shear); different per image. (hue=0: no colour round trip.)"""
    limit = 30.0
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    slope = 0.6 / 31
    ramps = torch.stack([0.2 + slope * xs, 0.2 + slope * ys, torch.full_like(xs, 0.5)]).expand(16, 3, 32, 32)
    out = aug.augment(ramps, still(32, hue=0.0, **{kind: limit}), *unit_stats(3), gen())[:, :2, 8:24, 8:24]
    design = torch.stack([xs[8:24, 8:24].flatten(), ys[8:24, 8:24].flatten(), torch.ones(256)], 1).double()
    values = out.reshape(32, 256).double()
    coef = torch.linalg.lstsq(design, values.T).solution.T  # (16 images * 2 channels, 3)
    assert (values - coef @ design.T).abs().max() < 1e-5, "the view of a ramp is not a ramp"
    maps = (coef[:, :2] / slope).reshape(16, 2, 2)  # row c: d(input coordinate c) / d(output x, y)
    if kind == "rotation":
        assert_close(maps @ maps.transpose(1, 2), torch.eye(2, dtype=torch.float64).expand(16, 2, 2), rtol=0,
                     atol=1e-3, name="M M^T")
        assert_close(torch.linalg.det(maps), torch.ones(16, dtype=torch.float64), rtol=0, atol=1e-3, name="det")
        angle = torch.atan2(maps[:, 1, 0], maps[:, 0, 0]).rad2deg()
    else:
        assert_close(maps[:, [0, 1, 1], [0, 0, 1]], torch.tensor([1.0, 0.0, 1.0]).double().expand(16, 3), rtol=0,
                     atol=1e-3, name="shear map")
        angle = torch.atan(maps[:, 0, 1]).rad2deg()
    assert angle.abs().max() <= limit + 0.05 and angle.abs().max() > 10.0
    assert len(set(angle.round(decimals=2).tolist())) == 16, "images share an angle"


@pytest.mark.parametrize("scale,ratio", [(1.0, 1.0), (0.25, 1.0), (0.25, 4.0), (0.5, 0.5)])
def test_crop_scale_and_ratio(scale, ratio):
    """A crop of area `scale` (of the image) with width/height `ratio` stretches the view by
    sqrt(scale*ratio) input pixels per output pixel along x and sqrt(scale/ratio) along y."""
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    image = ((xs + 2 * ys) / 100).expand(8, 1, 32, 32)
    recipe = still(32, crop_scale=(scale, scale), crop_ratio=(ratio, ratio))
    out = aug.augment(image, recipe, *unit_stats(1), gen())[:, 0, 10:22, 10:22]
    step_x, step_y = min(1.0, math.sqrt(scale * ratio)), min(1.0, math.sqrt(scale / ratio))
    assert_close(out.diff(dim=2), torch.full_like(out.diff(dim=2), step_x / 100), rtol=1e-3, atol=1e-6, name="x")
    assert_close(out.diff(dim=1), torch.full_like(out.diff(dim=1), 2 * step_y / 100), rtol=1e-3, atol=1e-6,
                 name="y")
    if scale < 1:  # the crop's place is random per image
        assert len(set(out[:, 0, 0].round(decimals=5).tolist())) == 8


def test_grayscale_gives_equal_channels_of_luma():
    """grayscale_p=1: every channel is 0.299 R + 0.587 G + 0.114 B (ITU-R 601 luma)."""
    images = random_images((6, 3, 16, 16))
    out = aug.augment(images, still(16, grayscale_p=1.0), *unit_stats(3), gen())
    x = images.double() / 255
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3):
        assert_close(out[:, c], luma, rtol=0, atol=1e-5, name=f"channel {c}")
    single = random_images((2, 1, 16, 16))
    assert_close(aug.augment(single, still(16, grayscale_p=1.0), *unit_stats(1), gen()), single.double() / 255,
                 rtol=0, atol=1e-6, name="one channel untouched")


def test_grayscale_probability_is_per_image():
    images = random_images((64, 3, 8, 8))
    out = aug.augment(images, still(8, grayscale_p=0.5), *unit_stats(3), gen())
    gray = ((out[:, 0] - out[:, 1]).abs().amax((1, 2)) < 1e-6) & ((out[:, 1] - out[:, 2]).abs().amax((1, 2)) < 1e-6)
    assert 10 <= int(gray.sum()) <= 54


def test_brightness_jitter_scales_a_gray_image():
    """Brightness alone on a flat mid-gray: each view is flat at 0.5 * f, f in [0.6, 1.4], f per image."""
    images = torch.full((16, 3, 8, 8), 0.5)
    recipe = still(8, jitter_p=1.0, brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0)
    out = aug.augment(images, recipe, *unit_stats(3), gen())
    level = out.amax((1, 2, 3))
    assert (out.amax((1, 2, 3)) - out.amin((1, 2, 3))).max() < 1e-6
    assert level.min() >= 0.3 - 1e-6 and level.max() <= 0.7 + 1e-6
    assert len(set(level.round(decimals=5).tolist())) == 16


def reference_blur(x, sigma, radius):
    """Separable Gaussian with taps exp(-t^2 / 2 sigma^2), |t| <= radius, normalised; numpy."""
    t = np.arange(-radius, radius + 1)
    taps = np.exp(-t ** 2 / (2 * sigma ** 2))
    taps /= taps.sum()
    x = np.pad(x, [(0, 0), (0, 0), (radius, radius), (radius, radius)], mode="reflect")
    h, w = x.shape[2] - 2 * radius, x.shape[3] - 2 * radius
    rows = sum(taps[i] * x[:, :, :, i:i + w] for i in range(2 * radius + 1))
    return sum(taps[i] * rows[:, :, i:i + h] for i in range(2 * radius + 1))


def test_blur_matches_a_gaussian_away_from_the_border():
    """Fixed sigma, different images: each plane gets its own image's blur. Radius ceil(2 sigma);
    only pixels further than the radius from the border are compared (padding is a choice)."""
    images = random_images((3, 3, 16, 16))
    out = aug.augment(images, still(16, blur_p=1.0, blur_sigma=(1.0, 1.0)), *unit_stats(3), gen())
    want = reference_blur(images.numpy().astype(np.float64) / 255, 1.0, 2)
    assert_close(out[..., 2:-2, 2:-2], torch.from_numpy(want)[..., 2:-2, 2:-2], rtol=0, atol=1e-5)


def test_blur_keeps_constants_and_smooths_noise():
    """A flat image stays flat (up to the border); a random one loses variance; blur_p is per image."""
    flat = torch.full((4, 3, 16, 16), 0.3)
    out = aug.augment(flat, still(16, blur_p=1.0, blur_sigma=(0.5, 2.0)), *unit_stats(3), gen())
    assert_close(out, flat, rtol=0, atol=ROUND)
    noisy = random_images((8, 1, 16, 16)).float() / 255
    out = aug.augment(noisy, still(16, blur_p=1.0, blur_sigma=(0.5, 2.0)), *unit_stats(1), gen())
    assert (out.var(dim=(1, 2, 3)) < 0.7 * noisy.var(dim=(1, 2, 3))).all()
    same = (random_images((1, 3, 16, 16)).float() / 255).expand(32, 3, 16, 16)  # 3 planes per image
    out = aug.augment(same, still(16, blur_p=0.5, blur_sigma=(0.5, 2.0)), *unit_stats(3), gen())
    plane_untouched = (out - same).abs().amax((2, 3)) < ROUND  # (image, channel)
    assert (plane_untouched.all(1) | ~plane_untouched.any(1)).all(), "channels of one image blurred differently"
    untouched = plane_untouched.all(1)
    assert 4 <= int(untouched.sum()) <= 28
    blurred = out[~untouched]
    assert len(set(blurred.var(dim=(1, 2, 3)).round(decimals=7).tolist())) == len(blurred), "sigma not per image"


def test_noise():
    """noise_p=1: a flat 0.5 image gets per-image noise of std <= noise_std, clamped to [0, 1];
    noise_std=0 adds nothing."""
    flat = torch.full((16, 3, 16, 16), 0.5)
    out = aug.augment(flat, still(16, noise_p=1.0, noise_std=0.1), *unit_stats(3), gen())
    spread = (out - 0.5).std(dim=(1, 2, 3))
    assert spread.max() > 0.01 and spread.max() < 0.1 * 1.2
    # std is uniform in [0, noise_std] per image: with 16 images some are far below the top.
    assert spread.min() < 0.05 and len(set(spread.round(decimals=6).tolist())) == 16, "noise std not per image"
    assert_close(aug.augment(flat, still(16, noise_p=1.0, noise_std=0.0), *unit_stats(3), gen()), flat, rtol=0,
                 atol=ROUND, name="noise_std=0")
    bright = torch.full((4, 1, 16, 16), 0.98)
    out = aug.augment(bright, still(16, noise_p=1.0, noise_std=0.5), *unit_stats(1), gen(1))
    assert out.min() >= 0 and out.max() <= 1 and (out == 1).any()


def test_rotate_hue():
    """0 and 1 turns are the identity, three 1/3 turns make one, luma is kept, grays are fixed
    points and a half turn really moves colour."""
    x = torch.rand(4, 3, 6, 6, generator=gen(), dtype=torch.float64)
    turns = lambda v: torch.full((4,), v, dtype=torch.float64)
    assert_close(aug._rotate_hue(x, turns(0.0)), x, rtol=0, atol=1e-12)
    assert_close(aug._rotate_hue(x, turns(1.0)), x, rtol=0, atol=1e-12)
    third = x
    for _ in range(3):
        third = aug._rotate_hue(third, turns(1 / 3))
    assert_close(third, x, rtol=0, atol=1e-12)
    luma = lambda t: 0.299 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2]
    assert_close(luma(aug._rotate_hue(x, turns(0.3))), luma(x), rtol=0, atol=1e-12)
    gray = x[:, :1].expand(4, 3, 6, 6)
    assert_close(aug._rotate_hue(gray, turns(0.3)), gray, rtol=0, atol=1e-12)
    assert (aug._rotate_hue(x, turns(0.5)) - x).abs().max() > 0.1
    per_image = aug._rotate_hue(x, torch.tensor([0.0, 1.0, 0.5, 0.0], dtype=torch.float64))
    assert_close(per_image[[0, 1, 3]], x[[0, 1, 3]], rtol=0, atol=1e-12)
    assert_close(aug._rotate_hue(x.float(), turns(1.0).float()), x.float(), rtol=0, atol=1e-5, name="float32")


@pytest.mark.parametrize("recipe,channels", [("digits", 1), ("natural", 3)])
def test_each_image_gets_its_own_parameters(recipe, channels):
    """Eight copies of one image in a batch give eight different views."""
    one = random_images((1, channels, 8, 8)) if recipe == "digits" else random_images((1, channels, 32, 32))
    out = aug.augment(one.expand(8, *one.shape[1:]), RECIPES[recipe], *unit_stats(channels), gen())
    for i in range(8):
        for j in range(i):
            assert (out[i] - out[j]).abs().max() > 1e-3, (i, j)


# ----------------------------------------------------------------------------------- knn

def unit(rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_knn_separated_clusters():
    """Tight clusters around orthogonal centres: every query is right."""
    g = gen()
    centres = torch.eye(4, 16)
    labels = torch.arange(4).repeat_interleave(10)
    bank = F.normalize(centres[labels] + 0.05 * torch.randn(40, 16, generator=g), dim=1)
    q_labels = torch.arange(4).repeat(5)
    queries = F.normalize(centres[q_labels] + 0.05 * torch.randn(20, 16, generator=g), dim=1)
    assert knn.knn_top1(bank, labels, queries, q_labels, k=5) == 1.0
    assert knn.knn_top1(bank, labels, queries, (q_labels + 1) % 4, k=5) == 0.0


def test_knn_float64_features_and_tiny_temperatures():
    """Votes take the features' dtype, and exp(s / T) at T = 0.001 (e^1000) does not overflow:
    the nearest neighbour decides, as the limit T -> 0 says."""
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0]], dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 1, 1, 0])
    query = F.normalize(torch.tensor([[1.0, 0.01]], dtype=torch.float64), dim=1)
    assert knn.knn_top1(bank, labels, query, torch.tensor([0]), k=3, temperature=0.001) == 1.0
    assert knn.knn_top1(bank, labels, query, torch.tensor([1]), k=3, temperature=10.0) == 1.0  # majority
    assert knn.knn_top1(bank.float(), labels, query.float(), torch.tensor([0]), k=3, temperature=0.001) == 1.0


def test_knn_weights_votes_by_exp_similarity():
    """Query e0; class 0 has one neighbour at similarity 0.9, class 1 two at 0.8, and five class-0
    features at -0.5 lie outside k=3. By hand:
        T=0.1: e^9 = 8103 > 2 e^8 = 5962            -> class 0 (a plain majority says 1)
        T=1:   e^0.9 = 2.46 < 2 e^0.8 = 4.45        -> class 1
        T=1, k=8 (all vote): 2.46 + 5 e^-0.5 = 5.49 > 4.45 -> class 0, so k matters."""
    bank = unit([[0.9, math.sqrt(1 - 0.81), 0, 0], [0.8, 0.6, 0, 0], [0.8, 0, 0.6, 0]]
                + [[-0.5, 0, 0, math.sqrt(0.75)]] * 5)
    bank_labels = torch.tensor([0, 1, 1, 0, 0, 0, 0, 0])
    query = unit([[1, 0, 0, 0]])
    top1 = lambda label, **kw: knn.knn_top1(bank, bank_labels, query, torch.tensor([label]), **kw)
    assert top1(0, k=3, temperature=0.1) == 1.0 and top1(1, k=3, temperature=0.1) == 0.0
    assert top1(1, k=3, temperature=1.0) == 1.0
    assert top1(0, k=8, temperature=1.0) == 1.0


def test_knn_k_larger_than_the_bank():
    bank, bank_labels = unit([[1, 0], [0, 1]]), torch.tensor([0, 1])
    queries, labels = unit([[1, 0.1], [0.1, 1], [0.2, 1]]), torch.tensor([0, 1, 1])
    assert knn.knn_top1(bank, bank_labels, queries, labels, k=100, temperature=1.0) == 1.0
    # On random data k=100 over a bank of 12 is k=12 (everyone votes), not some other k.
    g = gen(3)
    bank = F.normalize(torch.randn(12, 4, generator=g), dim=1)
    bank_labels = torch.tensor([0, 1, 2] * 4)
    queries = F.normalize(torch.randn(300, 4, generator=g), dim=1)
    labels = torch.randint(0, 3, (300,), generator=g)
    scores = {k: knn.knn_top1(bank, bank_labels, queries, labels, k=k, temperature=1.0) for k in (1, 12, 100)}
    assert scores[100] == scores[12] != scores[1], scores


def test_knn_against_numpy_across_query_chunks():
    """Random features, 1100 queries (past the 1024-row chunk), many classes, against a numpy
    implementation of the same rule."""
    g = gen(7)
    bank = F.normalize(torch.randn(150, 8, generator=g), dim=1)
    bank_labels = torch.randint(0, 6, (150,), generator=g)
    queries = F.normalize(torch.randn(1100, 8, generator=g), dim=1)
    q_labels = torch.randint(0, 6, (1100,), generator=g)
    for k, t in [(1, 0.1), (7, 0.1), (20, 0.5)]:
        sims = queries.double().numpy() @ bank.double().numpy().T
        top = np.argsort(-sims, axis=1)[:, :k]
        votes = np.zeros((1100, 6))
        for i in range(1100):
            np.add.at(votes[i], bank_labels.numpy()[top[i]], np.exp(sims[i, top[i]] / t))
        want = float((votes.argmax(1) == q_labels.numpy()).mean())
        assert knn.knn_top1(bank, bank_labels, queries, q_labels, k=k, temperature=t) == pytest.approx(want), (k, t)
    assert 0.05 < want < 0.6  # random labels: a non-trivial accuracy, not 0 or 1


# ----------------------------------------------------------------------------------- encode / probe

class Recorder(torch.nn.Module):
    """Linear + Dropout; records the training flag and batch size of every forward call."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.linear = torch.nn.Linear(5, 4)
        self.dropout = torch.nn.Dropout(0.5)
        self.dtype = dtype
        self.calls = []

    def forward(self, x):
        self.calls.append((self.training, len(x)))
        return self.dropout(self.linear(x)).to(self.dtype)


@pytest.mark.parametrize("training", [True, False])
def test_encode_normalises_in_eval_mode_and_restores_the_flag(training):
    torch.manual_seed(0)
    model = Recorder().train(training)
    x = torch.randn(10, 5, generator=gen())
    features = knn.encode(model, x, batch_size=3)
    assert model.training is training
    assert model.calls == [(False, 3), (False, 3), (False, 3), (False, 1)]
    with torch.no_grad():
        want = model.linear(x)
    assert_close(features, want / want.norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-7)
    assert_close(features.norm(dim=1), torch.ones(10), rtol=1e-6)
    assert features.dtype == torch.float32 and not features.requires_grad


def test_encode_returns_float32_for_low_precision_encoders():
    features = knn.encode(Recorder(torch.bfloat16), torch.randn(4, 5, generator=gen()))
    assert features.dtype == torch.float32
    assert_close(features.norm(dim=1), torch.ones(4), rtol=1e-6)


def clusters(n_per_class, classes, dim, spread, seed):
    g = gen(seed)
    labels = torch.arange(classes).repeat(n_per_class)
    centres = 3 * torch.eye(classes, dim)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


def test_linear_probe_separable():
    """Linearly separable classes: perfect on held-out points; against wrong labels, zero."""
    train, train_labels = clusters(20, 3, 6, 0.3, seed=1)
    test, test_labels = clusters(10, 3, 6, 0.3, seed=2)
    assert knn.linear_probe_top1(train, train_labels, test, test_labels) == 1.0
    assert knn.linear_probe_top1(train, train_labels, test, (test_labels + 1) % 3) == 0.0


def test_linear_probe_is_deterministic_and_leaves_the_global_rng_alone():
    """Overlapping classes (accuracy strictly between 0 and 1): the same seed gives the same
    number whatever the global seed, and the global RNG is not consumed."""
    train, train_labels = clusters(30, 3, 6, 2.5, seed=3)
    test, test_labels = clusters(30, 3, 6, 2.5, seed=4)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = knn.linear_probe_top1(train, train_labels, test, test_labels, steps=50, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    second = knn.linear_probe_top1(train, train_labels, test, test_labels, steps=50, seed=5)
    assert first == second and 0.4 < first < 1.0
