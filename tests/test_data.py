"""The built-in dataset, the ImageNet-layout scan and the torchvision loader.

Identity checks use folders of solid-colour PNGs whose colour encodes the file's
index: any crop or resize of a solid image keeps its colour, so the batches say
exactly which files a shard saw.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import anfast.data
from anfast.data import builtin as builtin_module
from anfast.data import create_loader
from anfast.data.builtin import SHAPES, generate_shapes
from anfast.data.folder import IMAGENET_MEAN, IMAGENET_STD, DataLayoutError, scan_split

# Colour levels 24 apart survive JPEG, resampling and float rounding untouched.
_LEVEL = 24
_LEVELS = 256 // _LEVEL


def index_colour(index: int) -> tuple[int, int, int]:
    return (12 + _LEVEL * (index % _LEVELS), 12 + _LEVEL * (index // _LEVELS % _LEVELS),
            12 + _LEVEL * (index // _LEVELS ** 2))


def decode_indices(images: torch.Tensor) -> list[int]:
    """Invert index_colour on normalized NCHW batches, from each image's mean colour."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3)
    std = torch.tensor(IMAGENET_STD).view(1, 3)
    rgb = (images.float().mean(dim=(2, 3)).cpu() * std + mean) * 255
    digits = torch.round((rgb - 12) / _LEVEL).long()
    return (digits[:, 0] + _LEVELS * digits[:, 1] + _LEVELS ** 2 * digits[:, 2]).tolist()


def make_indexed_folder(root: pathlib.Path, per_class: dict[str, tuple[int, int]], size=(40, 52)) -> dict:
    """train/ and val/ folders of solid PNGs; returns {split: {index: label}} in scan order."""
    expected = {}
    for split, column in (("train", 0), ("val", 1)):
        expected[split] = {}
        index = 0
        for label, name in enumerate(sorted(per_class)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class[name][column]):
                Image.new("RGB", size, index_colour(index)).save(folder / f"img_{i:03d}.png")
                expected[split][index] = label
                index += 1
    return expected


def collect(loader) -> tuple[list[int], list[int]]:
    indices, labels = [], []
    for images, batch_labels in loader:
        indices += decode_indices(images)
        labels += batch_labels.tolist()
    return indices, labels


@pytest.fixture
def indexed(tmp_path):
    # 23 val images over 3 classes: odd sizes so shards and the last batch are uneven.
    expected = make_indexed_folder(tmp_path, {"ant": (9, 8), "bee": (7, 7), "cat": (8, 8)})
    return tmp_path, expected


# ---------------------------------------------------------------- built-in dataset

def _tree_digest(root: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_shapes_are_deterministic_per_seed(tmp_path):
    first = generate_shapes(tmp_path / "a", seed=3, train_per_class=2, val_per_class=1, progress=False)
    second = generate_shapes(tmp_path / "b", seed=3, train_per_class=2, val_per_class=1, progress=False)
    other = generate_shapes(tmp_path / "c", seed=4, train_per_class=2, val_per_class=1, progress=False)
    digest = _tree_digest(first)
    assert len(digest) == len(SHAPES) * 3
    assert digest == _tree_digest(second)
    assert set(digest.values()).isdisjoint(_tree_digest(other).values())


def test_builtin_dataset_layout_and_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin_module, "generate_shapes",
                        functools.partial(generate_shapes, train_per_class=3, val_per_class=2, progress=False))
    monkeypatch.setenv("ANFAST_DATA_HOME", str(tmp_path))
    root = anfast.data.builtin_dataset()
    assert root.parent == tmp_path and root.name == "shapes-v1-seed0"
    assert [p.name for p in tmp_path.iterdir()] == [root.name], "the staging folder must be renamed away"
    train, val = scan_split(root, "train"), scan_split(root, "val")
    assert len(train.classes) >= 10 and train.classes == val.classes == sorted(SHAPES)
    assert len(train.samples) == 3 * len(SHAPES) and len(val.samples) == 2 * len(SHAPES)
    with Image.open(train.paths[0]) as image:
        assert image.format == "JPEG" and image.size == (64, 64)
    before = _tree_digest(root)
    monkeypatch.setattr(builtin_module, "generate_shapes", None)  # a second call must not regenerate
    assert anfast.data.builtin_dataset(tmp_path) == root
    assert _tree_digest(root) == before


def test_builtin_shape_is_drawn_with_contrast():
    image = np.asarray(builtin_module.render_shape("square", np.random.default_rng(0)), dtype=float)
    centre, corner = image[24:40, 24:40].mean(axis=(0, 1)), image[:6, :6].mean(axis=(0, 1))
    assert np.abs(centre - corner).max() > 40, "the shape must stand out from the background"


# ---------------------------------------------------------------- layout errors

def test_layout_errors_name_the_path(tmp_path, indexed):
    with pytest.raises(DataLayoutError, match="does not exist"):
        create_loader(tmp_path / "nowhere", "train", batch_size=2, image_size=8, loader="torch")
    empty_root = tmp_path / "only_train"
    (empty_root / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataLayoutError, match=r"only_train/val is missing; expected .*train/<class>"):
        create_loader(empty_root, "val", batch_size=2, image_size=8, loader="torch")
    with pytest.raises(DataLayoutError, match=r"class folder .*only_train/train/a holds no image"):
        create_loader(empty_root, "train", batch_size=2, image_size=8, loader="torch")
    (tmp_path / "flat" / "val").mkdir(parents=True)
    with pytest.raises(DataLayoutError, match="no class folders"):
        create_loader(tmp_path / "flat", "val", batch_size=2, image_size=8, loader="torch")
    (empty_root / "train" / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(DataLayoutError, match="holds no image"):
        create_loader(empty_root, "train", batch_size=2, image_size=8, loader="torch")


def test_argument_errors(indexed, monkeypatch):
    root, _ = indexed
    with pytest.raises(ValueError, match="loader='pillow' is not one of"):
        create_loader(root, "train", batch_size=2, image_size=8, loader="pillow")
    with pytest.raises(ValueError, match="split='test'"):
        create_loader(root, "test", batch_size=2, image_size=8)
    with pytest.raises(ValueError, match="shard_id=2"):
        create_loader(root, "val", batch_size=2, image_size=8, shard_id=2, num_shards=2)
    with pytest.raises(ValueError, match="drop_last=True on split='val'"):
        create_loader(root, "val", batch_size=2, image_size=8, drop_last=True)
    monkeypatch.setattr(anfast.data.loader, "has_dali", lambda: False)
    with pytest.raises(ImportError, match=r"pip install anfast\[dali\]"):
        create_loader(root, "train", batch_size=2, image_size=8, loader="dali")
    auto = create_loader(root, "val", batch_size=2, image_size=8, workers=0)
    assert auto.name == "torch" and "not installed" in auto.reason


# ---------------------------------------------------------------- torch loader

def test_val_output_shape_normalization_and_labels(indexed):
    root, expected = indexed
    loader = create_loader(root, "val", batch_size=5, image_size=12, loader="torch", workers=0,
                           channels_last=True)
    assert loader.name == "torch" and loader.classes == ["ant", "bee", "cat"]
    assert len(loader) == 5 and loader.num_samples == 23  # 23 = 4 full batches + 3
    sizes = []
    for images, labels in loader:
        sizes.append(len(labels))
        assert images.shape[1:] == (3, 12, 12) and images.dtype == torch.float32
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64
    assert sizes == [5, 5, 5, 5, 3]
    # Solid colour c must come out as (c / 255 - mean) / std in every pixel.
    colour = torch.tensor(index_colour(0), dtype=torch.float32) / 255
    reference = ((colour - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)
    first, _ = next(iter(loader))
    torch.testing.assert_close(first[0], reference.expand(3, 12, 12), atol=1e-5, rtol=0)
    indices, labels = collect(loader)
    assert indices == sorted(expected["val"])
    assert labels == [expected["val"][i] for i in indices]


@pytest.mark.parametrize("num_shards", [2, 3])
def test_sharded_val_sees_every_sample_once(indexed, num_shards):
    root, expected = indexed
    seen, batches = [], 0
    for shard_id in range(num_shards):
        loader = create_loader(root, "val", batch_size=4, image_size=10, loader="torch", workers=0,
                               shard_id=shard_id, num_shards=num_shards)
        indices, labels = collect(loader)
        assert len(indices) == loader.num_samples
        assert labels == [expected["val"][i] for i in indices]
        seen += indices
        batches += len(loader)
    assert sorted(seen) == sorted(expected["val"])
    assert batches == sum(-(-(23 * (s + 1) // num_shards - 23 * s // num_shards) // 4) for s in range(num_shards))


def test_a_shard_of_no_image_is_refused_before_loading(indexed):
    """23 val images on 24 processes: a process would evaluate nothing (DALI refused this;
    the torch loader gave the shard zero batches and evaluate failed later)."""
    root, _ = indexed
    create_loader(root, "val", batch_size=4, image_size=10, loader="torch", workers=0, shard_id=22, num_shards=23)
    with pytest.raises(DataLayoutError, match=r"/val has 23 image\(s\), fewer than num_shards=24 .*run fewer "
                                              r"processes$"):
        create_loader(root, "val", batch_size=4, image_size=10, loader="torch", workers=0, shard_id=0, num_shards=24)


def test_loading_a_sample_seeds_the_cpu_generator_only(indexed, monkeypatch):
    """torch.manual_seed inside the sample's fork also reseeded every CUDA generator (and
    left them so): a run's dropout and Gumbel noise on the GPU followed the last sample."""
    root, _ = indexed
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    loader = create_loader(root, "train", batch_size=4, image_size=10, loader="torch", workers=0, seed=3)
    first = [images for images, _ in loader]
    assert reseeded == [] and len(first) == 6
    # The crops are still drawn per sample from (seed, epoch, index): a pass after other
    # draws from the global generator equals the first.
    torch.rand(100)
    assert all(torch.equal(a, b) for a, b in zip(first, (images for images, _ in loader), strict=True))


def test_train_shards_shuffle_per_epoch_and_drop_last(indexed):
    root, expected = indexed
    loaders = [create_loader(root, "train", batch_size=4, image_size=10, loader="torch", workers=0, seed=7,
                             shard_id=shard_id, num_shards=2) for shard_id in range(2)]
    # 24 train images, 2 shards: 12 each, 3 full batches of 4.
    assert [len(loader) for loader in loaders] == [3, 3] and loaders[0].num_samples == 12
    epochs = []
    for epoch in range(2):
        seen = []
        for loader in loaders:
            loader.set_epoch(epoch)
            indices, labels = collect(loader)
            assert labels == [expected["train"][i] for i in indices]
            seen.append(indices)
        assert sorted(seen[0] + seen[1]) == sorted(expected["train"])
        epochs.append(seen)
    assert epochs[0] != epochs[1], "set_epoch must reshuffle"
    loaders[0].set_epoch(1)
    assert collect(loaders[0])[0] == epochs[1][0], "an epoch's order follows from seed + epoch"


def _corrupt(root: pathlib.Path) -> None:
    buffer = root / "val" / "bee" / "truncated.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buffer)
    data = buffer.read_bytes()
    buffer.write_bytes(data[: len(data) // 2])
    (root / "val" / "cat" / "readme.jpg").write_text("this is not a JPEG")


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_files_are_skipped_and_counted(indexed, workers):
    root, expected = indexed
    _corrupt(root)
    loader = create_loader(root, "val", batch_size=4, image_size=10, loader="torch", workers=workers)
    assert loader.num_samples == 25
    with pytest.warns(RuntimeWarning, match="skipped unreadable image .*(truncated|readme).jpg"):
        indices, _ = collect(loader)
    assert loader.skipped == 2
    assert sorted(indices) == sorted(expected["val"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # each bad file is warned about once per loader
        collect(loader)
    assert loader.skipped == 2, "skipped counts distinct files, not visits"
    assert sorted(pathlib.Path(path).name for path in loader.dropped) == ["readme.jpg", "truncated.jpg"]


# ---------------------------------------------------------------- data check

def test_scan_finds_unreadable_files_and_caches_per_directory_state(indexed, tmp_path, monkeypatch):
    from anfast.data.check import find_unreadable

    root, _ = indexed
    _corrupt(root)
    paths = scan_split(root, "val").paths
    cache = tmp_path / "cache"
    first = find_unreadable(paths, cache_dir=cache, progress=False)
    assert not first.from_cache and first.num_files == 25
    assert sorted(pathlib.Path(path).name for path in first.bad) == ["readme.jpg", "truncated.jpg"]
    assert "truncated" in first.bad[str(root / "val" / "bee" / "truncated.jpg")]
    second = find_unreadable(paths, cache_dir=cache, progress=False)
    assert second.from_cache and second.bad == first.bad
    # The same files spelled relative to another directory hit the cache and are named as given:
    # a `data check ds` before a `train --data /abs/ds` once let DALI read the bad files.
    relative = [os.path.relpath(path, tmp_path) for path in paths]
    monkeypatch.chdir(tmp_path)
    spelled = find_unreadable(relative, cache_dir=cache, progress=False)
    assert spelled.from_cache and sorted(spelled.bad) == sorted(os.path.relpath(p, tmp_path) for p in first.bad)
    Image.new("RGB", (8, 8)).save(root / "val" / "cat" / "readme.jpg", format="JPEG")  # repaired
    third = find_unreadable(paths, cache_dir=cache, progress=False)
    assert not third.from_cache and [pathlib.Path(path).name for path in third.bad] == ["truncated.jpg"]


def test_data_check_command(indexed, tmp_path, monkeypatch, capsys):
    from anfast.cli.data import check_command

    monkeypatch.setenv("ANFAST_DATA_HOME", str(tmp_path / "home"))
    root, _ = indexed
    assert check_command(root, progress=False) == 0
    assert "train: 24 images, 0 unreadable" in capsys.readouterr().out
    _corrupt(root)
    assert check_command(root, progress=False) == 1
    report = capsys.readouterr().out
    assert "train: 24 images, 0 unreadable (cached scan" in report
    assert "val: 25 images, 2 unreadable (scanned" in report and "readme.jpg: UnidentifiedImageError" in report
    assert check_command(root / "val" / "cat", progress=False) == 1, "a plain folder is scanned recursively"
    with pytest.raises(DataLayoutError, match="is not a folder; give a dataset root"):
        check_command(root / "missing")


def test_data_check_reports_what_train_would_refuse(tmp_path, monkeypatch, capsys):
    import anfast.cli

    monkeypatch.setenv("ANFAST_DATA_HOME", str(tmp_path / "home"))
    root = tmp_path / "data"
    make_indexed_folder(root, {"ant": (2, 2), "bee": (2, 0), "cat": (0, 2)})
    (root / "train" / "dog").mkdir()
    for split in ("train", "val"):  # emu holds a folder named like an image, and no image
        (root / split / "emu" / "x.jpg").mkdir(parents=True)
    # bee has no val images, cat no train images: scan_split refuses the first empty
    # folder; the check lists all of them and the class mismatch, and keeps going.
    assert anfast.cli.main(["data", "check", str(root)]) == 1
    report = capsys.readouterr().out
    assert "Traceback" not in report
    for folder in ("train/cat", "train/dog", "train/emu", "val/bee", "val/emu"):
        assert f"layout: class folder {root / folder} holds no image" in report, report
    assert ("layout: train/ and val/ hold different class folders (only in train/: ['dog'], "
            "only in val/: []); both splits need the same classes") in report
    assert "train: 4 images, 0 unreadable" in report
    assert f"6 layout problem(s): `anfast train --data {root}` refuses this folder" in report

    import shutil
    shutil.rmtree(root / "val")
    assert anfast.cli.main(["data", "check", str(root)]) == 1
    assert f"layout: {root / 'val'} is missing" in capsys.readouterr().out


def test_16_bit_grey_is_scaled_to_8_bits_as_dali_does(tmp_path):
    from anfast.data.check import probe_image
    from anfast.data.torch_loader import load_rgb

    values = np.array([[0, 128, 129, 257], [32896, 32767, 65534, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as image:
        assert image.mode == "I;16"
    rgb = np.asarray(load_rgb(tmp_path / "grey16.png"))
    expected = np.array([[0, 0, 1, 1], [128, 127, 255, 255]])  # round(v / 257), by hand
    assert rgb.shape == (2, 4, 3) and (rgb == expected[..., None]).all()

    Image.fromarray(values.astype(np.int32)).save(tmp_path / "grey32.tif")
    with pytest.raises(ValueError, match="TIFF with 32-bit samples"):
        load_rgb(tmp_path / "grey32.tif")
    assert "TIFF with 32-bit samples (mode I), which DALI cannot decode" in probe_image(str(tmp_path / "grey32.tif"))


# ---------------------------------------------------------------- loader workers and signals

_WORKERS_AND_SIGNALS = """
import multiprocessing, signal, subprocess, sys, time
from anfast.data import create_loader

loader = create_loader(sys.argv[1], "val", batch_size=4, image_size=10, loader="torch", workers=2)
batches = iter(loader)
next(batches)
workers = multiprocessing.active_children()
assert len(workers) == 2, workers
# A scheduler's or a terminal's stop, sent by a process other than this one.
for worker in workers:
    for stop in (signal.SIGTERM, signal.SIGINT):
        subprocess.run([sys.executable, "-c", f"import os; os.kill({worker.pid}, {int(stop)})"],
                       check=True)
time.sleep(1.0)
print("alive:", [worker.is_alive() for worker in workers])
print("batches after the stops:", sum(1 for _ in batches))
# The loader and its persistent workers stay alive to the exit, as they did when a run
# stopped on SIGTERM: multiprocessing then ends them with terminate() and joins them.
"""


def test_loader_workers_drop_others_stops_and_end_with_their_training_process(indexed):
    root, _ = indexed
    # Its own session: should it hang, the whole group is killed, workers included.
    process = subprocess.Popen([sys.executable, "-c", _WORKERS_AND_SIGNALS, str(root)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail("the process did not exit with its loader workers alive (workers that "
                    f"ignore SIGTERM are joined forever at exit):\n{output}")
    assert process.returncode == 0, output
    assert "alive: [True, True]" in output, output
    assert "batches after the stops: 5" in output, output  # 23 images, batches of 4: 6 in all
