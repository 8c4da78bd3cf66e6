"""``use_streams``: rewrite an adjoined network's graph to run each student on its own
CUDA stream (DESIGN.md section 4c, "overlap"; what the rewritten graph runs is
anfast/nn/streams.py's).

- the graph gets a ``_use_network(k)`` node before each run of network k's nodes, and a
  ``_hand_over(x, k)`` node where a student first reads a tensor the base's stream made;
- a forward pre-hook makes the students' streams wait for the caller's, a forward hook
  joins them back before the loss.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch import nn

from anfast.adjoin import AdjoinedNetwork, _make_output
from anfast.nn import (AdjoinedBatchNorm2d, AdjoinedConv2d, AdjoinedGlobalResponseNorm, AdjoinedGroupNorm,
                       AdjoinedLayerNorm, AdjoinedLinear)
from anfast.nn import streams as runtime

__all__ = ["use_streams"]


def _networks_of(graph: torch.fx.Graph, adjoined: set) -> dict:
    """The network (0 = base or shared, k = student k) of every node: ``getitem(call, k)``
    of an adjoined module call starts network k; a node that reads a network-k node is
    network k (networks meet only in the output)."""
    network = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target is operator.getitem \
                and node.args[0] in adjoined:
            network[node] = node.args[1]
            continue
        if node.op == "call_function" and node.target is _make_output:
            network[node] = 0  # gathers every network's outputs: no work of its own
            continue
        found = {network.get(arg, 0) for arg in node.all_input_nodes} - {0}
        network[node] = found.pop() if len(found) == 1 and node.op != "output" else 0
    return network


def use_streams(network: nn.Module, count: int) -> nn.Module:
    """Run ``network``'s students on their own CUDA streams (``count`` 1 undoes nothing
    and adds nothing; ``count`` is 1 or the number of networks). Returns ``network``."""
    if not isinstance(network, AdjoinedNetwork):
        raise TypeError(f"use_streams: expected an AdjoinedNetwork (anfast.adjoin's result), "
                        f"got {type(network).__name__}")
    networks = network.num_students + 1
    if count not in (1, networks):
        raise ValueError(f"streams={count}: use 1 (one stream) or {networks} (one per network: "
                         f"the base and {network.num_students} student(s))")
    if count == 1 or "_network_streams" in network.__dict__:
        return network
    graph = network.graph
    kinds = (AdjoinedConv2d, AdjoinedBatchNorm2d, AdjoinedGlobalResponseNorm, AdjoinedGroupNorm, AdjoinedLayerNorm,
             AdjoinedLinear)
    adjoined = {node for node in graph.nodes if node.op == "call_module"
                and isinstance(network.get_submodule(node.target), kinds)}
    owner = _networks_of(graph, adjoined)
    current = 0
    for node in list(graph.nodes):
        if node.op in ("placeholder", "get_attr"):
            continue
        wanted = owner[node]
        if node in adjoined or node.op == "output":
            wanted = 0  # modules switch per network inside; the hook joins at the output
        free = node.op == "call_function" and node.target is operator.getitem
        if wanted != current and not free:  # taking an output apart launches nothing
            with graph.inserting_before(node):
                graph.call_function(runtime._use_network, (wanted,))
            current = wanted
        if wanted:
            for arg in list(node.all_input_nodes):
                if owner[arg] == 0 and arg.op != "get_attr" and arg not in adjoined:
                    with graph.inserting_before(node):
                        handed = graph.call_function(runtime._hand_over, (arg, wanted))
                    node.replace_input_with(arg, handed)
        if node in adjoined:
            current = 0
    network.recompile()
    network.__dict__["_network_streams"] = runtime.NetworkStreams(networks)
    network.register_forward_pre_hook(runtime._begin_hook)
    network.register_forward_hook(runtime._end_hook)
    return network
