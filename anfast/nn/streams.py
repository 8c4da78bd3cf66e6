"""Base and students on their own CUDA streams (DESIGN.md section 4c, "overlap").

Between the shared stem and the loss the networks of an adjoined model never read each
other's activations, so each student's kernels can run beside the base's instead of
after them: the small student convolutions of layers 3 and 4 fill SMs the base leaves
idle. ``use_streams(network, 2)`` gives every student its own stream:

- the graph gets a ``_use_network(k)`` node before each run of network k's nodes, and a
  ``_hand_over(x, k)`` node where a student first reads a tensor the base's stream made
  (the stem's output): the student's stream waits for it and the allocator is told
  (record_stream) that the student's stream still reads it;
- the adjoined modules (conv, norm, linear) switch streams per network inside;
- a forward pre-hook makes the students' streams wait for the caller's (the optimizer
  wrote the weights there), a forward hook joins them back before the loss and records
  the students' outputs on the caller's stream.

Autograd runs each backward op on its forward op's stream and synchronizes where
gradients cross streams (the shared weight's gradient), so the backward pass overlaps
too. Off CUDA, and outside a forward of the network, every node is a no-op: the CPU
runs the very code path of one stream and gets the same numbers.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Iterator, Optional

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_leaves

__all__ = ["NetworkStreams", "use_streams", "network_stream", "hand_over", "active_streams"]

_active: list["NetworkStreams"] = []


class NetworkStreams:
    """One CUDA stream per student; network 0 (the base) runs on the caller's stream.

    The stream operations are methods so a test can stand in for them on the CPU."""

    def __init__(self, networks: int):
        self.networks = networks
        self._streams: dict[torch.device, list] = {}
        self._main = None

    def begin(self, device: torch.device) -> None:
        """Make the students' streams wait for the caller's stream (weights, images)."""
        if device not in self._streams:
            self._streams[device] = [torch.cuda.Stream(device) for _ in range(self.networks - 1)]
        self._main = torch.cuda.current_stream(device)
        self._device = device
        for stream in self._streams[device]:
            stream.wait_stream(self._main)

    def _stream(self, n: int):
        return self._main if n == 0 else self._streams[self._device][n - 1]

    def switch(self, n: int) -> None:
        """Issue what follows on network n's stream."""
        torch.cuda.set_stream(self._stream(n))

    def hand_over(self, tensor: torch.Tensor, n: int, source: int = 0) -> None:
        """Network n reads ``tensor``, which network ``source``'s stream wrote."""
        stream = self._stream(n)
        stream.wait_stream(self._stream(source))
        tensor.record_stream(stream)

    def end(self, outputs) -> None:
        """Back on the caller's stream, after every student's work; the students'
        outputs are recorded there, where the loss reads them."""
        torch.cuda.set_stream(self._main)
        for stream in self._streams[self._device]:
            self._main.wait_stream(stream)
        for tensor in _tensors(outputs):
            tensor.record_stream(self._main)


def _tensors(value) -> Iterator[torch.Tensor]:
    return (leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor))


def active_streams() -> Optional[NetworkStreams]:
    """The streams of the adjoined forward now running, None outside one (and off CUDA)."""
    return _active[-1] if _active else None


@contextlib.contextmanager
def network_stream(n: int):
    """Run the block on network n's stream when streams are active, then return to the
    base's stream (where the graph calls every adjoined module)."""
    streams = active_streams()
    if streams is None:
        yield
        return
    streams.switch(n)
    try:
        yield
    finally:
        streams.switch(0)


def hand_over(tensor: torch.Tensor, n: int, source: int = 0) -> torch.Tensor:
    """``tensor``, written on network ``source``'s stream, is read by network n from here on."""
    streams = active_streams()
    if streams is not None and n != source:
        streams.hand_over(tensor, n, source)
    return tensor


def _use_network(n: int) -> None:
    streams = active_streams()
    if streams is not None:
        streams.switch(n)


def _hand_over(value, n: int):
    for tensor in _tensors(value):
        hand_over(tensor, n)
    return value


torch.fx.wrap("_use_network")
torch.fx.wrap("_hand_over")


def _begin_hook(module, args):
    images = next(iter(_tensors(args)), None)
    streams = module.__dict__.get("_network_streams")
    if streams is not None and images is not None and images.device.type == "cuda" \
            and not torch.cuda.is_current_stream_capturing():
        streams.begin(images.device)
        _active.append(streams)


def _end_hook(module, args, output):
    streams = module.__dict__.get("_network_streams")
    if _active and _active[-1] is streams:
        _active.pop()
        streams.end(output)


def _networks_of(graph: torch.fx.Graph, adjoined: set) -> dict:
    """The network (0 = base or shared, k = student k) of every node: ``getitem(call, k)``
    of an adjoined module call starts network k; a node that reads a network-k node is
    network k (networks meet only in the output)."""
    from anfast.adjoin import _make_output

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
    from anfast.adjoin import AdjoinedNetwork
    from anfast.nn import AdjoinedBatchNorm2d, AdjoinedConv2d, AdjoinedLinear

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
    kinds = (AdjoinedConv2d, AdjoinedBatchNorm2d, AdjoinedLinear)
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
                graph.call_function(_use_network, (wanted,))
            current = wanted
        if wanted:
            for arg in list(node.all_input_nodes):
                if owner[arg] == 0 and arg.op != "get_attr" and arg not in adjoined:
                    with graph.inserting_before(node):
                        handed = graph.call_function(_hand_over, (arg, wanted))
                    node.replace_input_with(arg, handed)
        if node in adjoined:
            current = 0
    network.recompile()
    network.__dict__["_network_streams"] = NetworkStreams(networks)
    network.register_forward_pre_hook(_begin_hook)
    network.register_forward_hook(_end_hook)
    return network
