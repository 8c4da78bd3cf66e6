"""Adjoined modules: one set of parameters, outputs for the base and every student."""

from anfast.nn.batchnorm import AdjoinedBatchNorm2d, AdjoinedSyncBatchNorm2d, convert_sync_batchnorm
from anfast.nn.conv import AdjoinedConv2d
from anfast.nn.layernorm import AdjoinedLayerNorm
from anfast.nn.linear import AdjoinedLinear

__all__ = ["AdjoinedConv2d", "AdjoinedBatchNorm2d", "AdjoinedSyncBatchNorm2d", "AdjoinedLayerNorm",
           "AdjoinedLinear", "convert_sync_batchnorm"]
