"""What every benchmark records next to its numbers: machine, versions, commit, load.

Benchmarks import this as ``from common import ...`` (they run as scripts from any
directory; each puts its own folder on sys.path first).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import subprocess

import torch

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def device_name(device: str | torch.device = "cpu") -> str:
    """The GPU's name for CUDA devices, else the CPU model from /proc/cpuinfo."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """HEAD of the checkout, with '-dirty' when tracked files differ from it; $ANFAST_COMMIT
    when set (a copy of the tree sent to a GPU machine may carry a stale .git)."""
    here = pathlib.Path(__file__).resolve().parent
    if os.environ.get("ANFAST_COMMIT"):
        return os.environ["ANFAST_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def gpu_driver() -> str:
    """The NVIDIA driver version as nvidia-smi reports it, or "unknown"."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True, timeout=30).stdout.split()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def environment(device: str | torch.device = "cpu") -> dict:
    """Device, versions, commit, date, CPU threads and load average for a result file
    (on CUDA also the driver, CUDA runtime, capability and SM count)."""
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchvision", "triton", "nvidia.dali"):
        try:
            found[name.replace("nvidia.", "nvidia-")] = __import__(name, fromlist=["__version__"]).__version__
        except ImportError:
            pass
    gpu = {}
    if torch.device(device).type == "cuda":
        found["cuda"] = torch.version.cuda
        found["cudnn"] = str(torch.backends.cudnn.version())
        properties = torch.cuda.get_device_properties(device)
        gpu = {"driver": gpu_driver(), "capability": f"{properties.major}.{properties.minor}",
               "sm_count": properties.multi_processor_count,
               "memory_gib": round(properties.total_memory / 2**30, 1)}
    return {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        **gpu,
        "versions": found,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }


def base_model(arch: str, num_classes: int) -> "str | torch.nn.Module":
    """--arch as the benchmarks' build_providers takes it: a torchvision model name as is
    (it builds the model), "timm:NAME" as the timm model built here."""
    if arch.startswith("timm:"):
        import timm

        return timm.create_model(arch.removeprefix("timm:"), num_classes=num_classes)
    return arch


def tune_ratios(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """backend -> {layer: fused ms / torch ms} over the verified candidates of one
    `anfast tune --out` JSON (or a benchmark file that wraps it under "tune")."""
    payload = json.loads(pathlib.Path(path).read_text())
    ratios: dict[str, dict[str, float]] = {}
    for row in payload.get("tune", payload)["layers"]:
        for backend, candidate in row.get("candidates", {}).items():
            if candidate.get("verified") and candidate.get("ms") and row.get("torch_ms"):
                ratios.setdefault(backend, {})[row["layer"]] = candidate["ms"] / row["torch_ms"]
    return ratios


def write_result(benchmark: str, payload: dict, out: str | os.PathLike | None = None) -> pathlib.Path:
    """Write ``payload`` as JSON to ``out`` or results/<benchmark>-<device>-<date>.json."""
    if out is None:
        device = payload.get("device", "unknown").lower()
        slug = "".join(c if c.isalnum() else "-" for c in device).strip("-")
        while "--" in slug:
            slug = slug.replace("--", "-")
        out = RESULTS / f"{benchmark}-{slug[:40]}-{datetime.date.today().isoformat()}.json"
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write this machine's environment record as JSON.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    record = {**environment(args.device), "cpu_count": os.cpu_count()}
    write_result("environment", record, args.out)
    print(json.dumps(record))
