"""Adjoined modules: one set of parameters, outputs for the base and every student."""

from anfast.nn.batchnorm import (
    AdjoinedBatchNorm1d,
    AdjoinedBatchNorm2d,
    AdjoinedSyncBatchNorm1d,
    AdjoinedSyncBatchNorm2d,
    convert_sync_batchnorm,
)
from anfast.nn.conv import AdjoinedConv2d
from anfast.nn.grn import AdjoinedGlobalResponseNorm
from anfast.nn.groupnorm import AdjoinedGroupNorm
from anfast.nn.layernorm import AdjoinedLayerNorm
from anfast.nn.linear import AdjoinedLinear

__all__ = ["AdjoinedConv2d", "AdjoinedBatchNorm2d", "AdjoinedBatchNorm1d", "AdjoinedSyncBatchNorm2d",
           "AdjoinedSyncBatchNorm1d", "AdjoinedGlobalResponseNorm", "AdjoinedGroupNorm", "AdjoinedLayerNorm",
           "AdjoinedLinear", "convert_sync_batchnorm"]
