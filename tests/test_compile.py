"""torch.compile and adjoined networks: a conv fixed to torch reaches the compiler as
plain aten convolutions; a conv left to the custom op stays one opaque node."""

import pytest
import torch

import anfast
from anfast.nn import AdjoinedConv2d
from anfast.ops import conv as conv_op
from anfast.loss import AdjoinedLoss
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from helpers import assert_close_rel, small_resnet


def _graph_capture():
    """An aot_autograd backend that keeps the forward and backward ATen graphs (the
    graphs inductor would receive) and runs them unoptimised."""
    graphs = {}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = gm
            return make_boxed_func(gm.forward)
        return compiler
    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward")), graphs


def _targets(gm) -> list[str]:
    return [str(node.target) for node in gm.graph.nodes if node.op == "call_function"]


@pytest.mark.slow
def test_adjoined_resnet50_compiles_like_a_plain_network():
    """1 graph, 0 breaks (fullgraph=True raises at a break, with its reason), and the
    compiler sees one aten convolution per base conv plus one per student conv (the stem's
    student is the base's leading channels: no conv of its own)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    an = anfast.adjoin("resnet50", alpha=4, policy="paper", num_classes=10, input_size=(3, 32, 32),
                       backend="torch")
    x = torch.randn(2, 3, 32, 32)

    convs = [m for m in an.modules() if isinstance(m, AdjoinedConv2d)]
    base_convs = sum(1 for m in an.architecture().modules() if isinstance(m, torch.nn.Conv2d))
    student_convs = sum(len(m.student_out_channels) for m in convs if not m.input_shared)
    assert (len(convs), base_convs, student_convs) == (53, 53, 52)  # 49 + 4 shortcut convs; stem shared

    backend, graphs = _graph_capture()
    out = torch.compile(an, fullgraph=True, backend=backend)(x)
    (out.base.sum() + out.student.sum()).backward()
    forward, backward = _targets(graphs["forward"]), _targets(graphs["backward"])
    assert not [t for t in forward + backward if t.startswith("anfast.")]
    assert sum(t.startswith("aten.convolution.") for t in forward) == base_convs + student_convs
    assert sum(t.startswith("aten.convolution_backward.") for t in backward) == base_convs + student_convs


@pytest.mark.slow
def test_compiled_adjoined_step_matches_eager():
    """Inductor against eager on one AN step: the loss and every parameter's gradient.

    In float64: batch norm over the few values of a 16 px ResNet's last stage amplifies
    inductor's fp32 reordering to a 3e-4 relative difference in the loss, which would
    hide a wrong graph instead of showing one. On a two-stage ResNet, every layer shrunk:
    ResNet-18's compile took 75 s of the suite."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    an = anfast.adjoin(small_resnet(5), alpha=4, policy="all", input_size=(3, 16, 16)).double()
    x, labels = torch.randn(3, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 3, 4])
    loss_fn = AdjoinedLoss()

    def step(model):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), labels, lambda_=0.5)
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in an.named_parameters()}

    eager_loss, eager_grads = step(an)
    compiled_loss, compiled_grads = step(torch.compile(an, fullgraph=True))
    assert_close_rel(compiled_loss, eager_loss, 1e-5, "loss")
    assert eager_grads.keys() == compiled_grads.keys()
    for name in eager_grads:
        assert_close_rel(compiled_grads[name], eager_grads[name], 1e-5, name)


@pytest.mark.slow
def test_compile_fullgraph_adjoined_resnet18_through_the_custom_op(monkeypatch):
    """With no traceable form the op is one opaque node, forward and backward."""
    monkeypatch.setattr(conv_op, "TRACEABLE_BACKENDS", {})
    torch._dynamo.reset()
    torch.manual_seed(0)
    an = anfast.adjoin("resnet18", alpha=4, policy="all", num_classes=10, input_size=(3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    backend, graphs = _graph_capture()
    out = torch.compile(an, fullgraph=True, backend=backend)(x)
    eager = an(x)
    assert_close_rel(out.base, eager.base, 1e-5, "compiled base")
    assert_close_rel(out.student, eager.student, 1e-5, "compiled student")
    assert "anfast.adjoined_conv2d.default" in _targets(graphs["forward"])
    (out.base.sum() + out.student.sum()).backward()
    assert "anfast.adjoined_conv2d_backward.default" in _targets(graphs["backward"])
    compiled_grad = an.layer2.get_submodule("0").conv1.weight.grad.clone()
    an.zero_grad()
    (eager.base.sum() + eager.student.sum()).backward()
    assert_close_rel(compiled_grad, an.layer2.get_submodule("0").conv1.weight.grad, 1e-5, "compiled dW")


@pytest.mark.slow
def test_compile_inductor_adjoined_conv_op(monkeypatch):
    """Inductor keeps the custom op opaque and checks its fake implementation's shapes/strides."""
    monkeypatch.setattr(conv_op, "TRACEABLE_BACKENDS", {})
    torch._dynamo.reset()
    conv = anfast.nn.AdjoinedConv2d(8, 12, 3, padding=1, student_out_channels=(4,), student_in_channels=(3,))
    x_b = torch.randn(2, 8, 9, 9).to(memory_format=torch.channels_last)
    x_s = torch.randn(2, 3, 9, 9).to(memory_format=torch.channels_last)
    compiled = torch.compile(conv, fullgraph=True)
    got, want = compiled(x_b, x_s), conv(x_b, x_s)
    for g, w in zip(got, want):
        assert_close_rel(g, w, 1e-5, "inductor")


class _GroupNormThenInPlaceReLU(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.GroupNorm(4, 16)
        self.relu, self.head = torch.nn.ReLU(inplace=True), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.relu(self.norm(self.conv(x))).mean((2, 3)))


class _StandardisedThenInPlaceReLUs(torch.nn.Module):
    """NFNet-like: a stem conv on the image, a ScaledStdConv2d, each masked (no norm
    follows) and followed by an in-place ReLU."""

    def __init__(self):
        super().__init__()
        timm = pytest.importorskip("timm")
        self.stem, self.conv = torch.nn.Conv2d(3, 16, 3, padding=1), timm.layers.ScaledStdConv2d(16, 16, 3, padding=1)
        self.act1, self.act2 = torch.nn.ReLU(inplace=True), torch.nn.ReLU(inplace=True)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.act2(self.conv(self.act1(self.stem(x)))).mean((2, 3)))


_SEARCHED = {  # model -> (a module making it, the SearchSpace attribute its mixed layer is in, that layer)
    "ConvNeXt block": (lambda: __import__("test_adjoin").ChannelsLastBlock("none"), "norm_points", "norm"),
    "GroupNorm, then an in-place ReLU": (_GroupNormThenInPlaceReLU, "norm_points", "norm"),
    "standardised conv, masked convs, in-place ReLUs": (_StandardisedThenInPlaceReLUs, "standardised_points", "conv"),
}


@pytest.mark.parametrize("model", list(_SEARCHED))
def test_a_dan_search_network_compiles_whole_and_matches_eager(model):
    """A search network whose norms and standardised convs mix the width choices in one
    pass (custom autograd functions: a ConvNeXt block's LayerNorms, a GroupNorm, a
    ScaledStdConv2d's filters) and whose convs take their masks into their filters, under
    inductor, fullgraph: the base and student outputs and the gradients of every
    parameter and of the gates, in float64."""
    from anfast.dan import SearchSpace, StudentMasks

    torch._dynamo.reset()
    torch.manual_seed(0)
    make, points, layer = _SEARCHED[model]
    network = anfast.adjoin(make(), alpha=1, policy="all", input_size=(3, 8, 8)).double()
    space = SearchSpace.from_network(network, choices=(1, 2, 4), round_to=4)
    assert layer in getattr(space, points)
    masks = StudentMasks(network, space)
    logits = torch.randn(len(space.groups), len(space.choices), dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    weights = [torch.randn(3, 4, dtype=torch.float64) for _ in range(2)]

    def step(model):
        network.zero_grad(set_to_none=True)
        logits.grad = None
        masks.set_gates(torch.softmax(logits, -1))
        output = model(x)
        outputs = (output.base, output.student)
        sum(((out * w).sum() for out, w in zip(outputs, weights))).backward()
        return [out.detach() for out in outputs], {"gates": logits.grad.clone(), **{
            name: p.grad.clone() for name, p in network.named_parameters() if p.grad is not None}}

    eager_outputs, eager_grads = step(network)
    compiled_outputs, compiled_grads = step(torch.compile(network, fullgraph=True))
    for name, compiled, eager in zip(["base", "student"], compiled_outputs, eager_outputs):
        assert_close_rel(compiled, eager, 1e-9, name)
    assert eager_grads.keys() == compiled_grads.keys()
    for name in eager_grads:
        assert_close_rel(compiled_grads[name], eager_grads[name], 1e-9, name)
