"""``anfast data``: ``check DIR`` finds unreadable images, ``builtin`` creates the shapes dataset."""

from __future__ import annotations

import argparse
import os
import pathlib

from anfast.data.builtin import builtin_dataset
from anfast.data.check import find_unreadable
from anfast.data.folder import IMAGE_EXTENSIONS, SPLITS, DataLayoutError, layout_problems, scan_split

__all__ = ["builtin_command", "check_command", "register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` subcommand (``check DIR``, ``builtin [--root]``) to the anfast CLI."""
    parser = subparsers.add_parser("data", help="check an image folder or create the built-in dataset")
    commands = parser.add_subparsers(dest="data_command", metavar="{check,builtin}", required=True)

    check = commands.add_parser(
        "check", help="find images that cannot be decoded (DALI stops on them); the result is cached",
        description="Decode every image under DIR once (ImageNet layout DIR/train, DIR/val, or any folder) "
                    "and list the unreadable ones. The DALI loader reuses the cached result and leaves "
                    "those files out. Exit status 1 when any file is unreadable.")
    check.add_argument("dir", type=pathlib.Path, help="dataset root (with train/ and val/) or any image folder")
    check.add_argument("--workers", type=_workers, default=os.cpu_count() or 1,
                       help="decoding processes; 0 or 1 decodes in this process (default: the CPU count)")
    check.set_defaults(func=lambda args: check_command(args.dir, workers=args.workers))

    builtin = commands.add_parser("builtin", help="create the built-in shapes dataset and print its path")
    builtin.add_argument("--root", type=pathlib.Path, default=None,
                         help="parent folder (default: $ANFAST_DATA_HOME or ~/.cache/anfast)")
    builtin.add_argument("--seed", type=_seed, default=0)
    builtin.set_defaults(func=lambda args: builtin_command(args.root, seed=args.seed))


def _image_files(directory: pathlib.Path) -> list[str]:
    return sorted(str(path) for path in directory.rglob("*")
                  if path.is_file() and path.name.lower().endswith(IMAGE_EXTENSIONS))


def _image_groups(directory: pathlib.Path) -> dict[str, list[str]]:
    # A split is scanned as the loaders list it, so the cached result is the one they look up;
    # a split whose layout is refused (reported separately) still has its files checked.
    groups = {}
    for split in SPLITS:
        if (directory / split).is_dir():
            try:
                groups[split] = scan_split(directory, split).paths
            except DataLayoutError:
                groups[split] = _image_files(directory / split)
    return groups or {str(directory): _image_files(directory)}


def _whole_number(text: str) -> int:
    """``int(text)``, or argparse's error naming the text (a ValueError would show the
    type function's name: "invalid _seed value")."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _seed(text: str) -> int:
    """argparse type of --seed: numpy seeds are whole numbers >= 0."""
    seed = _whole_number(text)
    if seed < 0:
        raise argparse.ArgumentTypeError(f"{seed} is negative; give a seed >= 0")
    return seed


def _workers(text: str) -> int:
    """argparse type of --workers: a process count >= 0, as `anfast train --workers` takes."""
    workers = _whole_number(text)
    if workers < 0:
        raise argparse.ArgumentTypeError(f"{workers} must be >= 0 (0 or 1 decodes in this process)")
    return workers


def check_command(directory: str | os.PathLike, *, workers: int = 1, progress: bool = True) -> int:
    """Scan ``directory`` for unreadable images, print a report; 0 when all are readable, else 1."""
    directory = pathlib.Path(directory).expanduser()
    if not directory.is_dir():
        raise DataLayoutError(f"{directory} is not a folder; give a dataset root (train/, val/) or "
                              f"a folder of images")
    # A dataset root (train/ or val/ present) must also have the layout `anfast train` needs.
    problems = layout_problems(directory) if any((directory / s).is_dir() for s in SPLITS) else []
    for problem in problems:
        print(f"layout: {problem}")
    total_bad = 0
    for name, paths in _image_groups(directory).items():
        if not paths:
            print(f"{name}: no images ({', '.join(IMAGE_EXTENSIONS)})")
            continue
        scan = find_unreadable(paths, workers=workers, progress=progress)
        source = "cached scan" if scan.from_cache else "scanned"
        print(f"{name}: {scan.num_files} images, {len(scan.bad)} unreadable ({source}; {scan.cache_path})")
        for path, reason in sorted(scan.bad.items()):
            print(f"  {path}: {reason}")
        total_bad += len(scan.bad)
    if total_bad:
        print(f"{total_bad} unreadable file(s): the DALI loader leaves them out, the torch loader skips them "
              "with a warning; delete or replace them to train on every image")
    if problems:
        print(f"{len(problems)} layout problem(s): `anfast train --data {directory}` refuses this folder "
              f"until they are fixed")
    return 1 if total_bad or problems else 0


def builtin_command(root: str | os.PathLike | None = None, *, seed: int = 0) -> int:
    """Create the built-in dataset (if needed) and print its path."""
    print(builtin_dataset(root, seed=seed))
    return 0
