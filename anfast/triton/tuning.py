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

__all__ = [
    "is_interpreted",
    "forward_configs",
    "dgrad_configs",
    "wgrad_configs",
    "autotuned",
    "FORWARD_KEY",
    "DGRAD_KEY",
    "WGRAD_KEY",
]

# Autotune keys: the problem sizes a config choice depends on (argument names of the
# kernels). Dtypes of tensor arguments join the key inside triton.autotune.
FORWARD_KEY = ["BATCH", "H_OUT", "W_OUT", "C_IN", "C_OUT", "C_IN_S", "C_OUT_S", "KH", "KW"]
DGRAD_KEY = ["BATCH", "H", "W", "C_IN", "C_OUT", "C_IN_S", "C_OUT_S", "KH", "KW", "STRIDE_H"]
WGRAD_KEY = ["BATCH", "H_OUT", "W_OUT", "C_IN", "C_OUT", "C_IN_S", "C_OUT_S", "KH", "KW", "SPLIT_M"]

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


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated under TRITON_INTERPRET=1 (runs on the CPU)."""
    return type(kernel).__name__ == "InterpretedFunction"


def _config(block_m, block_n, block_k, num_warps, num_stages, **extra) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, **extra},
        num_warps=num_warps, num_stages=num_stages,
    )


def _gemm_configs(capability: tuple[int, int]) -> list[triton.Config]:
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
    if capability >= (9, 0):  # Hopper: 228 KiB shared memory per SM
        shapes = [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                  (64, 64, 64, 4, 4)]
    else:  # Ampere (sm_80 / sm_86) and anything older that runs Triton
        shapes = [(128, 128, 32, 4, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3)]
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
        shapes = [(64, 128, 64, 8, 3), (64, 64, 64, 4, 4), (128, 64, 64, 4, 3), (32, 128, 128, 8, 3)]
    else:
        shapes = [(32, 64, 64, 4, 3), (64, 64, 32, 4, 4), (32, 128, 64, 4, 3)]
    return [_config(*shape) for shape in shapes]


_CONFIGS = {"forward": forward_configs, "dgrad": dgrad_configs, "wgrad": wgrad_configs}
_KEYS = {"forward": FORWARD_KEY, "dgrad": DGRAD_KEY, "wgrad": WGRAD_KEY}


@functools.lru_cache(maxsize=None)
def autotuned(kernel, op: str, device: torch.device):
    """``kernel`` wrapped for ``device``: its one config, or triton.autotune over the configs.

    Returns a callable taking the kernel's arguments without the BLOCK constexprs and
    a grid function of the chosen config.
    """
    if is_interpreted(kernel) or device.type != "cuda":
        def launch(grid, *args, **kwargs):
            config = INTERPRETER_CONFIGS[op]
            kernel[grid(config)](*args, **kwargs, **config)
        return launch
    configs = _CONFIGS[op](torch.cuda.get_device_capability(device))
    tuned = triton.autotune(configs=configs, key=_KEYS[op])(kernel)

    def launch(grid, *args, **kwargs):
        tuned[grid](*args, **kwargs)
    return launch
