"""Print the CUTLASS / CuTe include directory of the pinned nvidia-cutlass package.

Used by setup.py (imported) and CMakeLists.txt (run with the build's Python), so
both builds compile against the same headers. The package ships them under
cutlass_library/source/include; the spec is read without importing cutlass_library
(whose import pulls in its Python generator and cuda-python).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys

CUTLASS_VERSION = "4.2.0.0"  # keep equal to the pins in pyproject.toml and README.md


def cutlass_include_dir() -> str:
    """The include directory (holding cutlass/ and cute/); ValueError saying the fix if absent."""
    fix = f"install it with: pip install nvidia-cutlass=={CUTLASS_VERSION}"
    try:
        version = importlib.metadata.version("nvidia-cutlass")
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"nvidia-cutlass is not installed; {fix}") from None
    if version != CUTLASS_VERSION:
        raise ValueError(f"nvidia-cutlass {version} is installed but the kernels pin {CUTLASS_VERSION}; {fix}")
    spec = importlib.util.find_spec("cutlass_library")
    include = os.path.join(spec.submodule_search_locations[0], "source", "include")
    if not os.path.isfile(os.path.join(include, "cutlass", "cutlass.h")):
        raise ValueError(f"nvidia-cutlass {version} has no headers under {include}; {fix}")
    return include


def cutlass_util_include_dir() -> str:
    """The CUTLASS tools' include directory (cutlass/util/), which CUTLASS 3's conv
    collectives include (packed_stride.hpp); the package ships it beside the headers."""
    util = os.path.join(os.path.dirname(cutlass_include_dir()), "tools", "util", "include")
    if not os.path.isfile(os.path.join(util, "cutlass", "util", "packed_stride.hpp")):
        raise ValueError(f"nvidia-cutlass has no cutlass/util headers under {util}; "
                         f"reinstall it with: pip install nvidia-cutlass=={CUTLASS_VERSION}")
    return util


if __name__ == "__main__":
    try:
        print(cutlass_include_dir())
    except ValueError as error:
        sys.exit(f"find_cutlass.py: {error}")
