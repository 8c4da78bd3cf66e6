"""--streams: each student on its own CUDA stream. On the CPU a stand-in for the streams
checks the schedule like a race detector (every tensor a network reads was written on
its stream or handed over to it) and the numbers against one stream."""

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import anfast
from anfast.nn import conv as conv_module
from anfast.nn import streams as streams_module
from anfast.loss import AdjoinedLoss

from helpers import assert_close_rel


class RecordingStreams(streams_module.NetworkStreams):
    """CPU stand-in: tracks the current network instead of a CUDA stream, and which
    tensors (by storage) each network may read."""

    def __init__(self, networks):
        super().__init__(networks)
        self.current, self.readable, self.joined, self.switches = 0, set(), False, 0

    def begin(self, device):
        self._device, self.current, self.joined = device, 0, False

    def switch(self, n):
        self.current = n
        self.switches += 1

    def hand_over(self, tensor, n, source=0):
        self.readable.add((tensor.untyped_storage().data_ptr(), n))

    def end(self, outputs):
        self.current, self.joined = 0, True


class RaceDetector(TorchDispatchMode):
    """Every op of network k may read tensors made before the forward, on k, or handed
    over to k; records each op's network."""

    def __init__(self, streams):
        super().__init__()
        self.streams, self.writer, self.races, self.ops = streams, {}, [], []
        self.alive = []  # storages stay allocated, so an address names one tensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        n = self.streams.current
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                writer = self.writer.setdefault(key, "before")  # parameters, images: every stream waited
                if writer not in ("before", n) and (key, n) not in self.streams.readable:
                    self.races.append(f"{func} on network {n} reads a tensor of network {writer}")
        out = func(*args, **(kwargs or {}))
        self.alive.append(out)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):  # a new storage is written here; a view's is not
                self.writer.setdefault(t.untyped_storage().data_ptr(), n)
        self.ops.append((n, str(func)))
        return out


def _cpu_streams(monkeypatch, network, count):
    """use_streams on the CPU with the stand-in active during the network's forward."""
    anfast.use_streams(network, count)
    stand_in = RecordingStreams(count)
    network.__dict__["_network_streams"] = stand_in
    monkeypatch.setattr(streams_module, "_begin_hook", _begin_on_cpu)
    network._forward_pre_hooks.clear()
    network.register_forward_pre_hook(_begin_on_cpu)
    return stand_in


def _begin_on_cpu(module, args):
    streams = module.__dict__["_network_streams"]
    streams.begin(args[0].device)
    streams_module._active.append(streams)


@pytest.mark.parametrize("arch, alpha", [("resnet18", 4), ("resnet18", (2, 4)), ("mobilenet_v2", 4)])
def test_every_network_reads_only_its_own_or_handed_over_tensors(monkeypatch, arch, alpha):
    torch.manual_seed(0)
    an = anfast.adjoin(arch, alpha=alpha, policy="paper", num_classes=5, input_size=(3, 32, 32))
    stand_in = _cpu_streams(monkeypatch, an, an.num_students + 1)
    detector = RaceDetector(stand_in)
    with detector:
        out = an(torch.randn(2, 3, 32, 32))
    assert stand_in.joined and not streams_module._active
    assert not detector.races, detector.races[:5]
    networks = {n for n, op in detector.ops if "convolution" in op}
    assert networks == set(range(an.num_students + 1))  # every student's convs ran on its stream
    assert stand_in.current == 0  # the loss runs on the base's (the caller's) stream
    assert len(out.students) == an.num_students


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_pairs_read_only_their_own_tensors(monkeypatch, autocast):
    """The fused path (auto on a GPU, forced here) with three students: the pass of
    students 1 and 2 slices its weight and, under bf16 autocast, casts its inputs on
    student 1's stream, where it reads them."""
    monkeypatch.setattr(conv_module, "fixed_backend_name", lambda requested, device: None)
    torch.manual_seed(0)
    an = anfast.adjoin("resnet18", alpha=(2, 4, 8), policy="paper", num_classes=5, input_size=(3, 32, 32))
    stand_in = _cpu_streams(monkeypatch, an, an.num_students + 1)
    detector = RaceDetector(stand_in)
    with detector, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = an(torch.randn(2, 3, 32, 32))
    assert not detector.races, (len(detector.races), detector.races[:5])
    networks = {n for n, op in detector.ops if "conv" in op}
    assert networks == {0, 2}  # the passes (base, student 0) and (student 1, student 2)
    assert len(out.students) == 3


def test_two_streams_give_the_numbers_of_one(monkeypatch):
    """Outputs, loss and every gradient, bit for bit: the students' ops are the same ops."""
    torch.manual_seed(0)
    one = anfast.adjoin("resnet18", alpha=(2, 4), policy="paper", num_classes=5, input_size=(3, 32, 32))
    two = anfast.adjoin("resnet18", alpha=(2, 4), policy="paper", num_classes=5, input_size=(3, 32, 32))
    two.load_state_dict(one.state_dict())
    stand_in = _cpu_streams(monkeypatch, two, 3)
    x, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 4])
    results = []
    for network in (one, two):
        loss = AdjoinedLoss()(network(x), labels, lambda_=1.0)
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in network.named_parameters()},
                        {k: b.clone() for k, b in network.named_buffers()}))
    assert stand_in.switches > 0
    (loss_1, grads_1, buffers_1), (loss_2, grads_2, buffers_2) = results
    assert torch.equal(loss_1, loss_2)
    for name in grads_1:
        assert torch.equal(grads_1[name], grads_2[name]), name
    for name in buffers_1:  # the students' BatchNorm statistics too
        assert torch.equal(buffers_1[name], buffers_2[name]), name


def test_streams_count_is_checked():
    an = anfast.adjoin("resnet18", alpha=4, num_classes=5, input_size=(3, 32, 32))
    with pytest.raises(ValueError, match=r"streams=3: use 1 \(one stream\) or 2 \(one per network"):
        anfast.use_streams(an, 3)
    with pytest.raises(TypeError, match="expected an AdjoinedNetwork"):
        anfast.use_streams(torch.nn.Conv2d(3, 3, 1), 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_streams_match_one_stream():
    """On a GPU: the students really run on side streams, and the step's numbers match."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    kwargs = dict(alpha=(2, 4), policy="paper", num_classes=10, input_size=(3, 64, 64), backend="torch")
    one = anfast.adjoin("resnet50", **kwargs).to(device)
    two = anfast.adjoin("resnet50", **kwargs).to(device)
    two.load_state_dict(one.state_dict())
    anfast.use_streams(two, 3)
    # Where each network's norm of layer2.0.bn1 runs: the base's on the caller's stream,
    # each student's on a side stream of its own.
    seen = {}
    norm = two.get_submodule("layer2.0.bn1")
    for name, module in (("base", norm), ("student 0", norm.student_norms[0]),
                         ("student 1", norm.student_norms[1])):
        module.register_forward_pre_hook(
            lambda module, args, name=name: seen.setdefault(name, torch.cuda.current_stream()))
    x = torch.randn(8, 3, 64, 64, device=device)
    labels = torch.randint(0, 10, (8,), device=device)
    grads = []
    for network in (one, two):
        loss = AdjoinedLoss()(network(x), labels, lambda_=1.0)
        loss.backward()
        grads.append({k: p.grad for k, p in network.named_parameters()})
    torch.cuda.synchronize()
    for name in grads[0]:
        assert_close_rel(grads[1][name], grads[0][name], 1e-5, name)
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    assert seen["base"] == torch.cuda.default_stream(), seen
    assert len({seen["base"], seen["student 0"], seen["student 1"]}) == 3, seen


def test_train_with_streams_on_the_cpu_gives_the_run_of_one_stream(tmp_path, monkeypatch):
    """`anfast train --streams 2` switches networks in every step and evaluation (the CPU
    stand-in stands for the CUDA streams, which the CPU never begins) and trains the run
    of one stream: the same numbers, bit for bit."""
    from anfast.train import loop
    from test_train_config import make_image_folder, tiny_config

    installed = []

    def use_streams_with_the_stand_in(network, count):
        installed.append(_cpu_streams(monkeypatch, network, count))
        return network

    monkeypatch.setattr(loop, "use_streams", use_streams_with_the_stand_in)
    data = make_image_folder(tmp_path / "data")
    rows = {}
    for streams in (1, 2):
        summary = loop.fit(tiny_config(data, tmp_path / f"s{streams}", streams=streams, epochs=2))
        assert summary["streams"] == streams and summary["cuda_graphs"]["mode"] == "off"
        rows[streams] = [json.loads(line) for line in (tmp_path / f"s{streams}" / "metrics.jsonl")
                         .read_text().splitlines()]
    pick = lambda row: (row["train_loss"], row["base"], row["student"])  # noqa: E731
    assert [pick(r) for r in rows[1]] == [pick(r) for r in rows[2]]
    # Only the 2-stream run installed streams, and its forwards switched between the networks.
    (stand_in,) = installed
    assert stand_in.switches > 0 and stand_in.joined and not streams_module._active


def test_cuda_graphs_on_the_cpu_is_refused_before_anything_is_written(tmp_path):
    from anfast.train.config import ConfigError
    from anfast.train.loop import fit
    from test_train_config import make_image_folder, tiny_config

    data = make_image_folder(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"--cuda-graphs captures the step on a CUDA device and the "
                                          r"device is cpu; leave --cuda-graphs out"):
        fit(tiny_config(data, tmp_path / "run", cuda_graphs=True))
    assert not (tmp_path / "run" / "config.yaml").exists()
