"""anfast: train compressed CNNs with Adjoined Networks, on fused kernels."""

__version__ = "0.1.0"
