"""Tile configurations of the fused adjoined-conv kernels, chosen per problem size.

The configurations are built by a function of the device family and wrapped with
``triton.autotune`` lazily, on the first launch on a device: importing this module
never queries a device (a machine without a GPU must import the package).

The tile sizes below are the usual implicit-GEMM starting points for tensor-core
GPUs (128x128 or 128x64 output tiles, K steps of 32 or 64 channels, 3-4 pipeline
stages on Hopper's larger shared memory). They are NOT measured on this project's
kernels yet: benchmarks/conv.py and the autotuner pick among them on the device.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.testing

__all__ = [
    "is_interpreted",
    "student_block",
    "forward_configs",
    "dgrad_configs",
    "wgrad_configs",
    "autotuned",
    "Launcher",
    "configs",
    "FORWARD_KEY",
    "DGRAD_KEY",
    "WGRAD_KEY",
]

# Autotune keys: the problem sizes a config choice depends on (argument names of the
# kernels). Dtypes of tensor arguments join the key inside triton.autotune.
_GEOMETRY = ["KH", "KW", "STRIDE_H", "STRIDE_W", "PAD_H", "PAD_W"]
FORWARD_KEY = ["BATCH", "H_OUT", "W_OUT", "C_IN", "C_OUT", "C_IN_S", "C_OUT_S", *_GEOMETRY]
DGRAD_KEY = ["BATCH", "H", "W", "C_IN", "C_OUT", "C_IN_S", "C_OUT_S", *_GEOMETRY]
WGRAD_KEY = ["BATCH", "H_OUT", "W_OUT", "C_IN", "C_OUT", "C_IN_S", "C_OUT_S", *_GEOMETRY]

# The interpreter runs each program op by op in numpy, and its cost is the number of
# programs times loop steps (measured on the shared 2-core machine: 6 s for the 144
# programs of one 512x512 3x3 wgrad with 128-wide tiles). One mid-size config keeps
# the CPU tests fast while odd channel counts (up to 40) still span several tiles;
# autotuning there would only multiply the runtime.
INTERPRETER_CONFIGS = {
    "forward": {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
    "dgrad": {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
    "wgrad": {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32},
}


def student_block(channels: int) -> int:
    """The student's channel extent rounded up to a tile size (a power of two, at least
    16, the smallest tl.dot dimension); its tiles use min(BLOCK, this), so a narrow
    student is not padded to the base's tile."""
    return max(16, triton.next_power_of_2(channels))


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated under TRITON_INTERPRET=1 (runs on the CPU)."""
    return type(kernel).__name__ == "InterpretedFunction"


def _config(block_m, block_n, block_k, num_warps, num_stages, **extra) -> triton.Config:
    # 8 warps (256 threads) fit 2 CTAs per SM only at <= 128 registers a thread: cap them
    # there (benchmarks/kernel_report.py checks that no shipped config spills).
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, **extra},
        num_warps=num_warps, num_stages=num_stages, maxnreg=128 if num_warps == 8 else None,
    )


def _gemm_configs(capability: tuple[int, int]) -> list[triton.Config]:
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
    if capability >= (9, 0):  # Hopper: 228 KiB shared memory per SM
        # 128x128x64 with 8 warps spills 20 bytes at 128 registers (kernel_report, 2026-11-26)
        # and fits 1 CTA per SM without the cap: not shipped.
        shapes = [(128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)]
    else:  # Ampere (sm_80 / sm_86) and anything older that runs Triton
        # 128x128x32 with 8 warps spills 148-188 bytes at 128 registers, 64x64x64 (3 stages)
        # 24 bytes in layer3.0.conv2's dgrad: not shipped.
        shapes = [(128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4)]
    return [_config(*shape, GROUP_M=8) for shape in shapes]


def forward_configs(capability: tuple[int, int]) -> list[triton.Config]:
    """Forward configs: (BLOCK_M rows of N*H_out*W_out) x (BLOCK_N output channels)."""
    return _gemm_configs(capability)


def dgrad_configs(capability: tuple[int, int]) -> list[triton.Config]:
    """dgrad configs: (BLOCK_M input positions) x (BLOCK_N input channels), K over C_out."""
    return _gemm_configs(capability)


def wgrad_configs(capability: tuple[int, int]) -> list[triton.Config]:
    """wgrad configs: (BLOCK_N output channels) x (BLOCK_K input channels), reduced over BLOCK_M rows."""
    if capability >= (9, 0):
        # 32x128x128 with 8 warps spills 4 bytes at 128 registers (layer3.0.conv2): not shipped.
        shapes = [(64, 128, 64, 8, 3), (64, 64, 64, 4, 4), (128, 64, 64, 4, 3)]
    else:
        shapes = [(32, 64, 64, 4, 3), (64, 64, 32, 4, 4), (32, 128, 64, 4, 3)]
    return [_config(*shape) for shape in shapes]


_CONFIGS = {"forward": forward_configs, "dgrad": dgrad_configs, "wgrad": wgrad_configs}
_KEYS = {"forward": FORWARD_KEY, "dgrad": DGRAD_KEY, "wgrad": WGRAD_KEY}


def configs(op: str, capability: tuple[int, int]) -> list[triton.Config]:
    """The shipped configs of kernel ``op`` ("forward", "dgrad", "wgrad") for ``capability``."""
    return _CONFIGS[op](capability)


def _bench_config(kernel_call, quantiles):
    """The autotuner's timing of one config: do_bench with 10 ms of warm-up and 40 ms of
    repeats. Triton's default is 25 / 100 ms, which for three configs of each of the
    three kernels of ResNet-50's 23 distinct convs adds up to about 23 x 9 x 0.125 s =
    26 s of the first training step; 40 ms still covers dozens of runs of a conv."""
    return triton.testing.do_bench(kernel_call, warmup=10, rep=40, quantiles=quantiles)


class Launcher:
    """A kernel bound to its configs on one device; calling it launches and returns the
    meta-parameters (BLOCK_* and friends) of the config that ran."""

    def __init__(self, kernel, op: str, device: torch.device):
        self.kernel, self.op = kernel, op
        self.tuned = None
        if not (is_interpreted(kernel) or device.type != "cuda"):
            # cache_results keeps the choices on disk, so a new process does not re-benchmark.
            self.tuned = triton.autotune(configs=configs(op, torch.cuda.get_device_capability(device)),
                                         key=_KEYS[op], cache_results=True, do_bench=_bench_config)(kernel)

    @property
    def metas(self) -> list[dict]:
        """The meta-parameters of every config a launch may pick."""
        if self.tuned is None:
            return [INTERPRETER_CONFIGS[self.op]]  # read per call: tests swap the dict
        return [config.kwargs for config in self.tuned.configs]

    def __call__(self, grid, *args, **kwargs) -> dict:
        if self.tuned is None:
            (meta,) = self.metas
            self.kernel[grid(meta)](*args, **kwargs, **meta)
            return meta
        self.tuned[grid](*args, **kwargs)
        return self.tuned.best_config.kwargs


@functools.lru_cache(maxsize=None)
def autotuned(kernel, op: str, device: torch.device) -> Launcher:
    """``kernel`` wrapped for ``device``: its one interpreter config, or triton.autotune
    over the shipped configs (keyed by problem size, stride and padding)."""
    return Launcher(kernel, op, device)
