"""torch.compile(fullgraph=True) traces an adjoined ResNet-18 through the custom op."""

import pytest
import torch

import anfast

from helpers import assert_close_rel


@pytest.mark.slow
def test_compile_fullgraph_adjoined_resnet18_forward_and_backward():
    torch.manual_seed(0)
    an = anfast.adjoin("resnet18", alpha=4, policy="all", num_classes=10, input_size=(3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(an, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    eager = an(x)
    assert_close_rel(out.base, eager.base, 1e-5, "compiled base")
    assert_close_rel(out.student, eager.student, 1e-5, "compiled student")
    (out.base.sum() + out.student.sum()).backward()
    compiled_grad = an.layer2.get_submodule("0").conv1.weight.grad.clone()
    an.zero_grad()
    (eager.base.sum() + eager.student.sum()).backward()
    assert_close_rel(compiled_grad, an.layer2.get_submodule("0").conv1.weight.grad, 1e-5, "compiled dW")


@pytest.mark.slow
def test_compile_inductor_adjoined_conv_op():
    """Inductor keeps the op opaque and checks its fake implementation's shapes/strides."""
    conv = anfast.nn.AdjoinedConv2d(8, 12, 3, padding=1, student_out_channels=(4,), student_in_channels=(3,))
    x_b = torch.randn(2, 8, 9, 9).to(memory_format=torch.channels_last)
    x_s = torch.randn(2, 3, 9, 9).to(memory_format=torch.channels_last)
    compiled = torch.compile(conv, fullgraph=True)
    got, want = compiled(x_b, x_s), conv(x_b, x_s)
    for g, w in zip(got, want):
        assert_close_rel(g, w, 1e-5, "inductor")
