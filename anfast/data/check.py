"""Find the images a decoder cannot read, once per directory state.

DALI stops the whole pipeline on a file it cannot decode, so before a DALI loader
starts (and on ``anfast data check DIR``) every file is opened once with PIL: header
verification plus a full decode. JPEGs decode in draft mode (1/8 scale), which still
reads every entropy-coded byte, so truncation is found at a fraction of the cost.

The result is cached as JSON under ``<data home>/checks/``, keyed by a hash of the
sorted (path, size, mtime) list: a second start on an unchanged dataset costs one
``stat`` per file, and any added, removed or rewritten file invalidates the cache.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import pathlib
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tqdm import tqdm

from anfast.data.builtin import default_data_home
from anfast.data.folder import DataLayoutError, ImageList

__all__ = ["ScanResult", "find_unreadable", "probe_image", "require_a_readable_image", "to_rgb"]

_CACHE_VERSION = 3  # 2: TIFFs with 32-bit samples count as unreadable; 3: bad files by absolute path
# Below this many files a process pool costs more to start than it saves.
_PARALLEL_THRESHOLD = 512


# Integer grey modes wider than 8 bits: PIL's convert("RGB") clips them at 255 (a 16-bit
# PNG turns white), where DALI scales 0..65535 to 0..255.
_WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, the way DALI's image decoder (``output_type=RGB``) makes it.

    Measured against DALI's CPU decoder on generated files: 16-bit grey becomes
    round(v / 257); alpha (LA, RGBA, palette transparency) is dropped, not composited;
    palette, 1-bit, grey and CMYK convert as PIL converts them (CMYK within one grey
    level). tests/test_dali.py checks each mode. DALI fails on, or garbles, TIFFs with
    32-bit samples, so both loaders refuse those (ValueError).
    """
    if image.format == "TIFF" and image.mode in ("I", "F"):
        raise ValueError(f"TIFF with 32-bit samples (mode {image.mode}), which DALI cannot decode; "
                         f"save it with 8 or 16 bits per sample")
    if image.mode in _WIDE_GREY_MODES:
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64) / 257), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class ScanResult:
    """Outcome of a scan: ``bad`` maps each unreadable path to the decoder's complaint."""

    num_files: int
    bad: dict[str, str]
    cache_path: pathlib.Path
    from_cache: bool


def probe_image(path: str) -> str | None:
    """None when PIL can verify and decode ``path``, else the reason it cannot."""
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            to_rgb(image)
    except Exception as error:  # noqa: BLE001 - any failure means "DALI must not see this file"
        return f"{type(error).__name__}: {error}"
    return None


def require_a_readable_image(images: ImageList) -> None:
    """Raise DataLayoutError when no file of ``images`` decodes, before a loader that skips
    unreadable files one by one (the torch loader) trains zero steps on them and exports an
    untrained network. Stops at the first readable file: one decode for a healthy folder."""
    first_reason = None
    for path in images.paths:
        reason = probe_image(path)
        if reason is None:
            return
        first_reason = first_reason or f"{path}: {reason}"
    raise DataLayoutError(f"{images.root} holds {len(images.samples)} image file(s) and none can be "
                          f"decoded (first: {first_reason}); replace them with readable images (list "
                          f"them with `anfast data check {images.root.parent}`)")


def _state_key(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def find_unreadable(paths: list[str], *, workers: int = 1, cache_dir: str | os.PathLike | None = None,
                    progress: bool = True) -> ScanResult:
    """Scan ``paths`` (or reuse the cached scan of the same files) for unreadable images.

    ``workers`` processes decode in parallel; ``cache_dir`` defaults to
    <$ANFAST_DATA_HOME or ~/.cache/anfast>/checks.
    """
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_data_home() / "checks"
    cache_path = cache_dir / f"{_state_key(paths)}.json"
    if cache_path.is_file():
        cached = json.loads(cache_path.read_text())
        if cached.get("version") == _CACHE_VERSION and cached.get("num_files") == len(paths):
            return ScanResult(len(paths), _as_given(paths, cached["bad"]), cache_path, from_cache=True)

    bar = dict(total=len(paths), desc="anfast: checking images", unit="img", disable=not progress)
    if workers > 1 and len(paths) >= _PARALLEL_THRESHOLD:
        # Forked, as torch's DataLoader workers are: the children only run PIL, and spawning
        # would re-run a user's training script that lacks a __main__ guard.
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            reasons = list(tqdm(pool.map(probe_image, paths, chunksize=64), **bar))
    else:
        reasons = [probe_image(path) for path in tqdm(paths, **bar)]
    bad = {path: reason for path, reason in zip(paths, reasons) if reason is not None}

    cache_dir.mkdir(parents=True, exist_ok=True)
    # Written to a temporary name and renamed, so concurrent ranks never read half a file.
    # Keyed by absolute path, as the cache file's name is: the same folder given as
    # `ds` and as `/abs/ds` must find its bad files (DALI then skips them).
    staging = cache_path.with_suffix(f".{os.getpid()}.tmp")
    absolute = {os.path.abspath(path): reason for path, reason in bad.items()}
    staging.write_text(json.dumps({"version": _CACHE_VERSION, "num_files": len(paths), "bad": absolute},
                                  indent=1))
    os.replace(staging, cache_path)
    return ScanResult(len(paths), bad, cache_path, from_cache=False)


def _as_given(paths: list[str], bad: dict[str, str]) -> dict[str, str]:
    """A cached scan's bad files (absolute paths) under the names ``paths`` spells them."""
    return {path: bad[os.path.abspath(path)] for path in paths if os.path.abspath(path) in bad}
