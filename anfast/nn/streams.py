"""Base and students on their own CUDA streams (DESIGN.md section 4c, "overlap").

Between the shared stem and the loss the networks of an adjoined model never read each
other's activations, so each student's kernels can run beside the base's instead of
after them: the small student convolutions of layers 3 and 4 fill SMs the base leaves
idle. ``anfast.use_streams(network, 2)`` (anfast/streams.py, the graph rewrite) gives
every student its own stream; this module is what the rewritten graph and the adjoined
modules run:

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
from typing import Iterator, Optional

import torch
from torch.utils._pytree import tree_leaves

__all__ = ["NetworkStreams", "network_stream", "hand_over", "active_streams"]

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
