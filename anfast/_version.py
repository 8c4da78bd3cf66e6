"""The package's version, one floor below everything that reports or keys by it."""

from importlib import metadata


def version() -> str:
    """pyproject.toml's version: from the installed metadata, or read from the source tree
    while an editable install has not written its metadata yet (gpu_check's tests start
    beside its background build)."""
    try:
        return metadata.version("anfast")
    except metadata.PackageNotFoundError:
        import tomllib
        from pathlib import Path

        with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as file:
            return tomllib.load(file)["project"]["version"]
