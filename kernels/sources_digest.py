"""Print the digest of the device code's sources for a list of target archs.

benchmarks/prebuild_kernels.sh writes it next to the kernel objects it compiles
(SOURCES.sha256), and setup.py links prebuilt objects (ANFAST_PREBUILT_KERNELS) only when
that digest is this tree's: objects compiled from other kernel sources (another commit's
tile table, say) would link and run kernels the bindings do not describe. The digest
covers every kernels/*.cu, *.cuh and *.h (what the objects are compiled from; the bindings
in csrc/ are compiled on the GPU machine), find_cutlass.py (the pinned CUTLASS headers'
version) and the archs, normalised ("90", "90;" and " 90" are one). It does not cover
nvcc's version: objects of another nvcc 13.x link.

    python kernels/sources_digest.py 90
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

KERNELS = Path(__file__).resolve().parent


def sources_digest(archs: str) -> str:
    """sha256 of the archs and of each device-code source's name and bytes, in name order."""
    digest = hashlib.sha256()
    numbers = sorted({a.strip() for a in archs.replace(",", ";").split(";") if a.strip()})
    digest.update(("archs=" + ";".join(numbers) + "\0").encode())
    for path in sorted(p for p in KERNELS.iterdir()
                       if p.suffix in (".cu", ".cuh", ".h") or p.name == "find_cutlass.py"):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python kernels/sources_digest.py ARCHS   (e.g. 90, or '80;90')")
    print(sources_digest(sys.argv[1]))
