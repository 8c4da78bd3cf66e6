"""The built-in dataset: procedurally drawn shapes, stored as real JPEG folders.

It exists so that ``anfast train`` runs end to end on any machine with no download:
ten shape classes drawn at a random size, position, rotation and colour on a noisy
two-colour gradient, written as 64x64 JPEGs in the ImageNet folder layout
(``train/<class>/*.jpg``, ``val/<class>/*.jpg``), so the very loaders that read
ImageNet (torchvision and DALI) read it too.

Every image comes from its own numpy generator seeded by (seed, split, class, index),
so the bytes do not depend on generation order and one seed always gives the same
files.
"""

from __future__ import annotations

import io
import math
import os
import pathlib
import shutil
import tempfile
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

__all__ = ["SHAPES", "builtin_dataset", "create_atomically", "default_data_home", "generate_shapes"]

DATASET_NAME = "shapes-v1"
IMAGE_SIZE = 64
TRAIN_PER_CLASS = 600
VAL_PER_CLASS = 100
JPEG_QUALITY = 92
# Shapes are drawn at 4x and box-filtered down, which antialiases the edges the way
# a photographed object would be and keeps thin parts (ring, cross) visible.
_SUPERSAMPLE = 4


def default_data_home() -> pathlib.Path:
    """Where anfast keeps generated data and scan caches: $ANFAST_DATA_HOME or ~/.cache/anfast."""
    home = os.environ.get("ANFAST_DATA_HOME")
    return pathlib.Path(home) if home else pathlib.Path.home() / ".cache" / "anfast"


def _regular_polygon(sides: int, radius: float, phase: float = 0.0) -> np.ndarray:
    angles = phase + np.arange(sides) * 2 * math.pi / sides
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int, outer: float, inner: float) -> np.ndarray:
    angles = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _cross(arm: float) -> np.ndarray:
    a, b = arm, 1.0
    return np.array([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a),
                     (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)], dtype=float)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], axis=1) / 17.0


def _arrow() -> np.ndarray:
    return np.array([(-1.0, -0.22), (0.15, -0.22), (0.15, -0.6), (1.0, 0.0),
                     (0.15, 0.6), (0.15, 0.22), (-1.0, 0.22)])


# Each drawer gets a mask canvas, the centre (px), the radius (px) and the rotation
# (radians) and draws the shape in white. Squares and diamonds are one class under
# rotation, so the classes are chosen to stay distinct at any angle.
def _polygon_drawer(unit_polygon: Callable[[], np.ndarray]) -> Callable:
    def draw(canvas: ImageDraw.ImageDraw, centre: np.ndarray, radius: float, angle: float) -> None:
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        points = unit_polygon() @ rotation.T * radius + centre
        canvas.polygon([tuple(p) for p in points], fill=255)

    return draw


def _draw_circle(canvas, centre, radius, angle):
    canvas.ellipse([*(centre - radius), *(centre + radius)], fill=255)


def _draw_ring(canvas, centre, radius, angle):
    canvas.ellipse([*(centre - radius), *(centre + radius)], fill=255)
    inner = radius * 0.6
    canvas.ellipse([*(centre - inner), *(centre + inner)], fill=0)


def _draw_crescent(canvas, centre, radius, angle):
    canvas.ellipse([*(centre - radius), *(centre + radius)], fill=255)
    bite = centre + 0.45 * radius * np.array([math.cos(angle), math.sin(angle)])
    canvas.ellipse([*(bite - 0.85 * radius), *(bite + 0.85 * radius)], fill=0)


SHAPES: dict[str, Callable] = {
    "arrow": _polygon_drawer(_arrow),
    "bar": _polygon_drawer(lambda: np.array([(-1.0, -0.3), (1.0, -0.3), (1.0, 0.3), (-1.0, 0.3)])),
    "circle": _draw_circle,
    "crescent": _draw_crescent,
    "cross": _polygon_drawer(lambda: _cross(0.3)),
    "heart": _polygon_drawer(_heart),
    "ring": _draw_ring,
    "square": _polygon_drawer(lambda: _regular_polygon(4, 1.0, math.pi / 4) / math.sqrt(2) * 1.25),
    "star": _polygon_drawer(lambda: _star(5, 1.0, 0.42)),
    "triangle": _polygon_drawer(lambda: _regular_polygon(3, 1.0, -math.pi / 2)),
}


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def render_shape(shape: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw one image of ``shape`` with the random draws taken from ``rng``."""
    big = size * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    # Large and near the centre: the class must survive RandomResizedCrop(scale=0.35).
    radius = rng.uniform(0.26, 0.40) * big
    centre = big / 2 + rng.uniform(-0.08, 0.08, size=2) * big
    SHAPES[shape](ImageDraw.Draw(mask), centre, radius, rng.uniform(0, 2 * math.pi))
    alpha = np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float32)[..., None] / 255

    corner_a, corner_b = rng.uniform(0, 255, size=(2, 3))
    direction = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    ramp = (math.cos(direction) * xx + math.sin(direction) * yy)
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    background = corner_a + ramp[..., None] * (corner_b - corner_a)
    background += rng.normal(0, 14, size=(size, size, 3))
    # Keep the shape readable: its luminance differs from the background's by >= 70.
    background_lum = float(_luminance(background.mean(axis=(0, 1))))
    while True:
        colour = rng.uniform(0, 255, size=3)
        if abs(float(_luminance(colour)) - background_lum) >= 70:
            break
    foreground = colour + rng.normal(0, 8, size=(size, size, 3))
    pixels = alpha * foreground + (1 - alpha) * background
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _encode_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def generate_shapes(out_dir: str | os.PathLike, *, seed: int = 0, train_per_class: int = TRAIN_PER_CLASS,
                    val_per_class: int = VAL_PER_CLASS, image_size: int = IMAGE_SIZE,
                    progress: bool = True) -> pathlib.Path:
    """Write the shapes dataset into ``out_dir`` (train/<class>/*.jpg, val/<class>/*.jpg).

    ``out_dir`` is filled in place; use :func:`builtin_dataset` for the cached,
    atomically created copy.
    """
    out_dir = pathlib.Path(out_dir)
    jobs = [(split, split_index, shape_index, shape, i)
            for split_index, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class)))
            for shape_index, shape in enumerate(sorted(SHAPES))
            for i in range(count)]
    for split, _, _, shape, _ in jobs:
        (out_dir / split / shape).mkdir(parents=True, exist_ok=True)
    for split, split_index, shape_index, shape, i in tqdm(jobs, desc=f"anfast: drawing {DATASET_NAME}",
                                                          unit="img", disable=not progress):
        rng = np.random.default_rng([seed, split_index, shape_index, i])
        data = _encode_jpeg(render_shape(shape, rng, image_size))
        (out_dir / split / shape / f"{shape}_{i:05d}.jpg").write_bytes(data)
    return out_dir


def builtin_dataset(root: str | os.PathLike | None = None, *, seed: int = 0) -> pathlib.Path:
    """Create (on first use) and return the built-in shapes dataset.

    The dataset lives in ``<root>/shapes-v1-seed<seed>`` with ``train/<class>/*.jpg``
    and ``val/<class>/*.jpg`` (10 classes, 600 train + 100 val images of 64x64 per
    class). ``root`` defaults to $ANFAST_DATA_HOME or ~/.cache/anfast. It is built in
    a temporary folder and renamed into place (:func:`create_atomically`). Same seed,
    same bytes.
    """
    root = pathlib.Path(root) if root is not None else default_data_home()
    return create_atomically(root / f"{DATASET_NAME}-seed{seed}", lambda staging: generate_shapes(staging, seed=seed))


def create_atomically(target: str | os.PathLike, build: Callable[[pathlib.Path], object]) -> pathlib.Path:
    """Return folder ``target``, first filling it with ``build(staging_folder)`` if it does not exist.

    The staging folder sits next to ``target`` and is renamed into place only when
    ``build`` returns, so an interrupted run or two processes starting together never
    leave a half-written folder behind.
    """
    target = pathlib.Path(target)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process renamed its copy into place first; theirs is identical.
            if not target.is_dir():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
