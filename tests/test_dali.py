"""DALI CPU pipelines against the torch loader and against the files they read.

Uses the solid-colour, index-encoding folders of test_data.py, so every batch says
which files a shard saw.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from test_data import _corrupt, collect, index_colour, make_indexed_folder

from anfast.data import create_loader
from anfast.data.folder import IMAGENET_MEAN, IMAGENET_STD

pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed (pip install anfast[dali])")


@pytest.fixture(autouse=True)
def private_scan_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ANFAST_DATA_HOME", str(tmp_path / "data_home"))


@pytest.fixture
def indexed(tmp_path):
    # 23 val images (odd: shards of 11 and 12, partial last batches), 24 train images.
    expected = make_indexed_folder(tmp_path / "data", {"ant": (9, 8), "bee": (7, 7), "cat": (8, 8)})
    return tmp_path / "data", expected


def dali(root, split, **options):
    defaults = dict(batch_size=4, image_size=12, loader="dali", workers=2)
    return create_loader(root, split, **{**defaults, **options})


def test_auto_picks_dali_when_installed(indexed):
    root, _ = indexed
    loader = create_loader(root, "val", batch_size=4, image_size=12)
    assert loader.name == "dali" and loader.reason.startswith("dali: auto, nvidia-dali is installed")


@pytest.mark.parametrize("num_shards", [1, 2])
def test_val_sees_every_sample_once_with_partial_batches(indexed, num_shards):
    root, expected = indexed
    seen = []
    for shard_id in range(num_shards):
        loader = dali(root, "val", shard_id=shard_id, num_shards=num_shards)
        shard_size = 23 * (shard_id + 1) // num_shards - 23 * shard_id // num_shards
        assert loader.name == "dali" and loader.num_samples == shard_size
        assert len(loader) == -(-shard_size // 4)
        for epoch in range(2):  # the second epoch must start clean, not mid-shard
            loader.set_epoch(epoch)
            indices, labels = collect(loader)
            assert sorted(indices) == indices, "validation is read in file order"
            assert labels == [expected["val"][i] for i in indices]
            assert len(indices) == shard_size
        seen += indices
    assert sorted(seen) == sorted(expected["val"])


def test_train_shards_partition_each_epoch(indexed):
    root, expected = indexed
    loaders = [dali(root, "train", seed=3, shard_id=shard_id, num_shards=2) for shard_id in range(2)]
    assert [len(loader) for loader in loaders] == [3, 3]
    orders = []
    for epoch in range(2):
        seen = []
        for loader in loaders:
            loader.set_epoch(epoch)
            indices, labels = collect(loader)
            assert labels == [expected["train"][i] for i in indices]
            seen.append(indices)
        assert sorted(seen[0] + seen[1]) == sorted(expected["train"]), f"epoch {epoch}"
        orders.append(seen)
    assert orders[0] != orders[1], "each epoch is reshuffled"
    # A resumed run replays the uninterrupted run's order: it follows from seed + epoch.
    resumed = [dali(root, "train", seed=3, shard_id=shard_id, num_shards=2) for shard_id in range(2)]
    for loader in resumed:
        loader.set_epoch(1)
    assert [collect(loader)[0] for loader in resumed] == orders[1]
    # Breaking off mid-epoch and iterating again restarts that epoch.
    loader = resumed[0]
    loader.set_epoch(1)
    next(iter(loader))
    assert collect(loader)[0] == orders[1][0]


def test_uneven_train_shards_run_equal_steps(tmp_path):
    make_indexed_folder(tmp_path, {"a": (12, 1), "b": (11, 1)})  # 23 train images
    loaders = [dali(tmp_path, "train", shard_id=shard_id, num_shards=2) for shard_id in range(2)]
    for epoch in range(3):
        batches = [[len(labels) for _, labels in loader] for loader in loaders]
        assert batches == [[4, 4], [4, 4]], f"epoch {epoch}: DDP ranks must run the same full batches"


@pytest.mark.parametrize("channels_last", [False, True])
def test_layout_dtype_and_normalization(indexed, channels_last):
    root, _ = indexed
    images, labels = next(iter(dali(root, "val", batch_size=5, channels_last=channels_last)))
    assert images.shape == (5, 3, 12, 12) and images.dtype == torch.float32
    assert labels.shape == (5,) and labels.dtype == torch.int64
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    assert images.is_contiguous(memory_format=memory_format)
    colour = torch.tensor(index_colour(0), dtype=torch.float32) / 255
    reference = ((colour - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)
    torch.testing.assert_close(images[0], reference.expand(3, 12, 12), atol=1e-4, rtol=0)


def _photo_like_jpegs(root: pathlib.Path) -> None:
    # Smooth gradients at sizes whose resize and centre crop hit both of torchvision's
    # rounding rules (truncated long side, half-pixel offsets rounded to even).
    rng = np.random.default_rng(0)
    sizes = [(60, 90), (131, 77), (100, 100), (97, 139), (64, 81), (75, 64)]
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i, (height, width) in enumerate(sizes):
                yy, xx = np.mgrid[0:height, 0:width]
                phase = rng.uniform(0, 6, size=3)
                pixels = np.stack([128 + 100 * np.sin(xx / 9 + phase[0]), 128 + 100 * np.cos(yy / 7 + phase[1]),
                                   128 + 80 * np.sin((xx + yy) / 11 + phase[2])], axis=-1)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / label / f"{i}.jpg", quality=95)


@pytest.mark.parametrize("image_size", [24, 33])
def test_val_pixels_match_the_torch_loader(tmp_path, image_size):
    _photo_like_jpegs(tmp_path)
    options = dict(batch_size=12, image_size=image_size, workers=1)
    (torch_images, torch_labels), = list(create_loader(tmp_path, "val", loader="torch", **options))
    (dali_images, dali_labels), = list(create_loader(tmp_path, "val", loader="dali", **options))
    assert torch.equal(torch_labels, dali_labels)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixel_error = ((torch_images - dali_images) * std * 255).abs().mean(dim=(1, 2, 3))
    assert pixel_error.max() <= 2.0, f"mean abs difference per image in grey levels: {pixel_error.tolist()}"


def test_a_shard_smaller_than_one_batch_is_a_clear_error(indexed):
    # 24 train images in 2 shards of 12: a batch of 13 (drop_last) never fills; DALI's own
    # error ("no data in the pipeline") came from inside the pipeline, as a traceback.
    from anfast.data import DataLayoutError

    root, _ = indexed
    with pytest.raises(DataLayoutError, match=rf"^{root}/train has 12 images per process, fewer than "
                                              rf"one batch of 13; lower --batch-size$"):
        dali(root, "train", batch_size=13, shard_id=1, num_shards=2)
    assert len(dali(root, "train", batch_size=12, shard_id=1, num_shards=2)) == 1


def test_train_augmentation_keeps_shape_and_range(tmp_path):
    _photo_like_jpegs(tmp_path)
    loader = create_loader(tmp_path, "train", batch_size=4, image_size=20, loader="dali", workers=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    for images, labels in batches:
        assert images.shape == (4, 3, 20, 20) and labels.dtype == torch.int64
        pixels = images * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        assert pixels.min() >= -1e-4 and pixels.max() <= 1 + 1e-4


def test_unreadable_files_are_dropped_and_reported(indexed):
    root, expected = indexed
    _corrupt(root)
    with pytest.warns(RuntimeWarning, match=r"(?s)drops 2 unreadable image\(s\) of 25.*truncated.jpg.*readme.jpg"):
        loader = dali(root, "val")
    assert loader.skipped == 2 and loader.num_samples == 23
    assert sorted(pathlib.Path(path).name for path in loader.dropped) == ["readme.jpg", "truncated.jpg"]
    indices, _ = collect(loader)
    assert sorted(indices) == sorted(expected["val"])


# ---------------------------------------------------------------- with the trainer

@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """The same 3-epoch run trained once through each loader (1-2 minutes each on 2 shared cores)."""
    from test_train_config import make_image_folder, tiny_config

    from anfast.train.loop import fit

    root = tmp_path_factory.mktemp("trainer")
    # 32 px, 12 steps per epoch, 3 epochs: at 2 epochs one of two runs still sat at 67% top-1.
    data = make_image_folder(root / "data", train_per_class=64, val_per_class=10, size=40)
    summaries = {}
    for name in ("torch", "dali"):
        # SGD: lr 0.02 was tuned for it; the trainer's AdamW default diverges at that lr.
        config = tiny_config(data, root / name, epochs=3, loader=name, workers=1, batch_size=16, lr=0.02,
                             optimizer="sgd",
                             image_size=32, policy="paper")
        summaries[name] = fit(config)
    return data, root, summaries


@pytest.mark.slow
def test_training_through_dali_reaches_the_torch_accuracy_band(trained_runs):
    _, _, summaries = trained_runs
    for network in ("base", "student"):
        top1 = {name: summary[network]["top1"] for name, summary in summaries.items()}
        assert min(top1.values()) >= 0.8, f"{network}: {top1}"
        assert abs(top1["torch"] - top1["dali"]) <= 0.1, f"{network}: {top1}"


@pytest.mark.slow
def test_one_checkpoint_evaluates_alike_through_both_loaders(trained_runs):
    from anfast.train.evaluate import evaluate
    from anfast.train.export import load_run

    data, root, _ = trained_runs
    config, an, _ = load_run(root / "torch", "last")
    metrics = {}
    for name in ("torch", "dali"):
        loader = create_loader(data, "val", batch_size=7, image_size=config.image_size, loader=name, workers=1)
        metrics[name] = evaluate(an, loader, torch.device("cpu"), alphas=config.alpha)
    for network, torch_row, dali_row in (("base", metrics["torch"]["base"], metrics["dali"]["base"]),
                                         ("student", metrics["torch"]["students"][0],
                                          metrics["dali"]["students"][0])):
        assert abs(torch_row["top1"] - dali_row["top1"]) <= 0.005, f"{network}: {torch_row} vs {dali_row}"
        assert torch_row["loss"] == pytest.approx(dali_row["loss"], rel=0.02, abs=1e-3), network


# ---------------------------------------------------------------- PIL modes

def _mode_images(rng):
    grey = rng.integers(0, 256, (9, 11)).astype(np.uint8)
    alpha = rng.integers(0, 256, (9, 11)).astype(np.uint8)
    rgb = rng.integers(0, 256, (9, 11, 3)).astype(np.uint8)
    palette_transparent = Image.fromarray(rgb).quantize(16)
    palette_transparent.info["transparency"] = 3
    return {
        "L.png": Image.fromarray(grey),
        "1.png": Image.fromarray(grey > 127),
        "I16.png": Image.fromarray(rng.integers(0, 65536, (9, 11)).astype(np.uint16)),
        "I16.tif": Image.fromarray(rng.integers(0, 65536, (9, 11)).astype(np.uint16)),
        "P.png": Image.fromarray(rgb).quantize(16),
        "P_transparency.png": palette_transparent,
        "LA.png": Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)]),
        "RGBA.png": Image.fromarray(np.dstack([rgb, alpha])),
        "CMYK.jpg": Image.frombytes("CMYK", (11, 9), np.dstack([rgb, alpha]).tobytes()),
    }


def test_torch_loader_decodes_every_pil_mode_like_dali(tmp_path):
    from nvidia.dali import fn, pipeline_def, types

    from anfast.data.torch_loader import load_rgb

    images = _mode_images(np.random.default_rng(0))
    for name, image in images.items():
        image.save(tmp_path / name, **({"quality": 100} if name.endswith(".jpg") else {}))
    paths = [str(tmp_path / name) for name in images]

    # The decoder and options of anfast.data.dali's pipelines, on DALI's CPU backend.
    @pipeline_def(batch_size=len(paths), num_threads=1, device_id=None)
    def decode():
        encoded, _ = fn.readers.file(files=paths)
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB, adjust_orientation=False)

    pipeline = decode()
    pipeline.build()
    decoded, = pipeline.run()
    for index, name in enumerate(images):
        with Image.open(paths[index]) as image:
            mode = image.mode
        dali_pixels = np.asarray(decoded[index]).astype(np.int64)
        torch_pixels = np.asarray(load_rgb(paths[index])).astype(np.int64)
        worst = int(np.abs(dali_pixels - torch_pixels).max())
        assert worst <= 1, f"{name} (PIL mode {mode}): torch and DALI differ by {worst} grey levels"
