"""The trade-off table and tradeoff.png of a run with nested students."""

import torch
import torchvision
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import anfast
from anfast.train.evaluate import format_table, network_costs
from anfast.runs.records import plot_tradeoff


def _resnet18_costs(w1, w2, w3, w4, classes):
    """Parameters and FLOPs (2 per multiply-add; convs and the fc only) of a ResNet-18 with stage
    widths w1..w4 on one 16 x 16 image, by hand. Output sizes: the 7 x 7 / 2 stem 8 x 8, the max
    pool 4 x 4, layer1 4 x 4, layer2 2 x 2, layer3 and layer4 1 x 1 (each stride 2 conv:
    (H + 2 - 3) // 2 + 1)."""
    params = 3 * w1 * 49 + 2 * w1  # stem conv (no bias) + batch norm
    flops = 2 * 3 * w1 * 49 * 8 * 8
    params += 4 * (9 * w1 * w1 + 2 * w1)  # layer1: four 3 x 3 convs + norms
    flops += 4 * 2 * 9 * w1 * w1 * 4 * 4
    for w_in, w, pixels in ((w1, w2, 2 * 2), (w2, w3, 1), (w3, w4, 1)):
        # first block: 3 x 3 w_in -> w, 3 x 3 w -> w, 1 x 1 w_in -> w shortcut; second block: two 3 x 3
        params += 9 * w_in * w + 9 * w * w + w_in * w + 2 * 9 * w * w + 5 * 2 * w
        flops += 2 * pixels * (9 * w_in * w + 9 * w * w + w_in * w + 2 * 9 * w * w)
    return {"params": params + w4 * classes + classes, "flops": flops + 2 * w4 * classes}


def test_costs_table_and_plot(tmp_path):
    """network_costs counts the base and both students: the base matches torchvision's resnet18
    (its parameters, FlopCounterMode run here) and a hand count, the students (widths halved and
    quartered) the hand count; a wrong parameter or FLOP count fails."""
    an = anfast.adjoin("resnet18", alpha=(2, 4), policy="all", num_classes=3, input_size=(3, 16, 16))
    costs = network_costs(an, 16)
    reference = torchvision.models.resnet18(num_classes=3).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        reference(torch.zeros(1, 3, 16, 16))
    base = {"params": sum(p.numel() for p in reference.parameters()), "flops": counter.get_total_flops()}
    assert _resnet18_costs(64, 128, 256, 512, 1000)["params"] == 11_689_512  # the published count
    assert costs[0] == base == _resnet18_costs(64, 128, 256, 512, 3), (costs[0], base)
    assert costs[1] == _resnet18_costs(32, 64, 128, 256, 3), costs[1]  # alpha 2
    assert costs[2] == _resnet18_costs(16, 32, 64, 128, 3), costs[2]  # alpha 4
    summary = {"base": {"top1": 0.9, "top5": 1.0, "loss": 0.3},
               "students": [{"top1": 0.8, "top5": 1.0, "loss": 0.5, "alpha": 2.0},
                            {"top1": 0.625, "top5": 0.95, "loss": 0.9, "alpha": None}]}
    lines = format_table(summary, costs).splitlines()
    assert lines[0].split() == ["network", "top-1", "%", "top-5", "%", "loss", "params", "GFLOPs"]
    assert lines[1].split() == ["base", "90.00", "100.00", "0.3000", f"{costs[0]['params']:,}",
                                f"{costs[0]['flops'] / 1e9:.3f}"]
    assert lines[2].startswith("student 0 (alpha 2)") and lines[3].startswith("student 1 (alpha per group)")
    assert lines[3].split()[-5:-3] == ["62.50", "95.00"]
    plot_tradeoff(summary, costs, tmp_path / "tradeoff.png", "resnet18")
    with Image.open(tmp_path / "tradeoff.png") as image:
        assert image.size[0] > image.size[1] > 300
