"""The trade-off table and tradeoff.png of a run with nested students."""

from PIL import Image

import anfast
from anfast.train.evaluate import format_table, network_costs
from anfast.runs.records import plot_tradeoff


def test_costs_table_and_plot(tmp_path):
    an = anfast.adjoin("resnet18", alpha=(2, 4), policy="all", num_classes=3, input_size=(3, 16, 16))
    costs = network_costs(an, 16)
    for network, expected in zip(costs, [anfast.export_base(an), anfast.export_student(an, 0),
                                         anfast.export_student(an, 1)]):
        assert network == anfast.profile(expected, (3, 16, 16))
    assert costs[0]["flops"] > costs[1]["flops"] > costs[2]["flops"]
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
