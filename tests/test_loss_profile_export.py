"""AdjoinedLoss against a hand-written formula, profile against hand counts, export round trips."""

import copy
import math
import pathlib
import sys

import pytest
import torch
import torchvision
from torch import nn

import anfast
from anfast.adjoin import AdjoinedOutput
from anfast.loss import get_lambda_schedule, paper_lambda


def test_loss_matches_the_paper_formula_in_float64():
    torch.manual_seed(0)
    base = torch.randn(4, 7, dtype=torch.float64)
    students = (torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64))
    target = torch.tensor([0, 3, 6, 2])
    t, lam = 2.0, 0.3
    loss = anfast.AdjoinedLoss(temperature=t)(AdjoinedOutput(base, students), target, lam)
    # By hand: CE on the base + lambda * T^2 * mean_batch sum_k p_b (log p_b - log p_s).
    ce = -sum(math.log(torch.softmax(base[i], 0)[target[i]]) for i in range(4)) / 4
    kl = 0.0
    for student in students:
        p_b, p_s = torch.softmax(base / t, 1), torch.softmax(student / t, 1)
        kl += t * t * float((p_b * (p_b.log() - p_s.log())).sum()) / 4
    assert float(loss) == pytest.approx(ce + lam * kl, rel=1e-12)


def test_loss_options():
    base = torch.randn(3, 5, requires_grad=True)
    student = torch.randn(3, 5, requires_grad=True)
    target = torch.tensor([1, 2, 3])
    out = AdjoinedOutput(base, (student,))
    # default: the KL term trains the base too
    (g,) = torch.autograd.grad(anfast.AdjoinedLoss().terms(out, target)["kl"], base)
    assert g.abs().sum() > 0
    (g,) = torch.autograd.grad(anfast.AdjoinedLoss(detach_teacher=True).terms(out, target)["kl"], base,
                               allow_unused=True)
    assert g is None or g.abs().sum() == 0
    with_ce = anfast.AdjoinedLoss(student_ce_weight=0.5)(out, target, 0.0)
    ce = nn.functional.cross_entropy
    assert with_ce.item() == pytest.approx((ce(base, target) + 0.5 * ce(student, target)).item(), rel=1e-6)


def test_lambda_schedules():
    assert [paper_lambda(e / 10) for e in (0, 2, 5, 9)] == [0.0, pytest.approx(0.16), 1.0, 1.0]
    assert get_lambda_schedule("constant")(0.0) == 1.0
    with pytest.raises(ValueError, match="unknown lambda schedule 'cubic'"):
        get_lambda_schedule("cubic")


def test_profile_counts_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(8 * 5 * 5, 4))
    stats = anfast.profile(model, (3, 5, 5))
    assert stats["params"] == 8 * 3 * 9 + 200 * 4 + 4
    assert stats["flops"] == 2 * (8 * 25 * 3 * 9) + 2 * (200 * 4)


def test_profile_of_an_adjoined_network_is_its_base_plus_its_students():
    # Its convs are custom ops: before they had FLOP formulas, profile() counted only the
    # classifiers of an adjoined network.
    an = anfast.adjoin("resnet18", alpha=(2, 4), policy="paper", num_classes=10, input_size=(3, 32, 32))
    base = anfast.profile(anfast.export_base(an), (3, 32, 32))["flops"]
    students = [anfast.profile(anfast.export_student(an, s), (3, 32, 32))["flops"] for s in range(2)]
    # The stem conv reads the image, the same for every network: it runs once, and the
    # students take leading channels of its output. By hand: 7x7, stride 2, 3 -> c channels
    # on 32 px (16 x 16 out) costs 2 * 16 * 16 * c * 3 * 49 FLOPs per student.
    assert an.conv1.input_shared
    stems = [2 * 16 * 16 * c * 3 * 49 for c in an.layer_widths["conv1"].student_out]
    assert anfast.profile(an, (3, 32, 32))["flops"] == base + sum(students) - sum(stems)


def test_resnet50_paper_student_size():
    """The paper's ResNet-50 student has 1.8M parameters without the classifier."""
    an = anfast.adjoin("resnet50", alpha=4, policy="paper", input_size=(3, 32, 32))
    student = anfast.export_student(an)
    conv_params = anfast.count_parameters(student, exclude=("fc",))
    assert abs(conv_params - 1.8e6) / 1.8e6 <= 0.10, conv_params


def test_save_and_load_student_without_pickle(tmp_path):
    torch.manual_seed(0)
    an = anfast.adjoin("mobilenet_v3_small", alpha=(2, 4), policy="all", num_classes=10,
                       input_size=(3, 32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = an(x)
    for index in range(2):
        anfast.export_student(an, index, path=tmp_path / f"s{index}")
        loaded = anfast.load_student(tmp_path / f"s{index}")
        assert type(loaded) is torchvision.models.MobileNetV3
        with torch.no_grad():
            assert (loaded(x) - out.students[index]).abs().max() <= 1e-5
    assert sorted(p.name for p in (tmp_path / "s0").iterdir()) == ["config.json", "model.safetensors"]


def test_load_student_of_a_user_class_needs_an_instance(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
    an = anfast.adjoin(model, alpha=2, policy="all", input_size=(3, 8, 8)).eval()
    anfast.export_student(an, path=tmp_path)
    with pytest.raises(ValueError, match="pass model="):
        anfast.load_student(tmp_path)
    loaded = anfast.load_student(tmp_path, model=model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert (loaded(x) - an(x).student).abs().max() <= 1e-5
    with pytest.raises(FileNotFoundError, match="config.json"):
        anfast.load_student(tmp_path / "missing")


def test_step_census_counts_on_meta_what_a_real_step_runs():
    """benchmarks/step_census.py counts ResNet-50 at batch 256 without running it, on the
    meta device: its FLOPs, calls and elements must be those of a real CPU step."""
    benchmarks = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(benchmarks))
    try:
        from step_census import census
        from train_throughput import build_providers
    finally:
        sys.path.remove(str(benchmarks))
    providers = build_providers("resnet18", 4.0, 10, (3, 32, 32))
    for name in ("base", "anfast_torch", "masked"):
        model, loss_fn = providers[name]
        for channels_last in (True, False):
            shape = dict(batch_size=2, image_size=32, num_classes=10, channels_last=channels_last)
            counted = census(copy.deepcopy(model), loss_fn, **shape)
            ran = census(copy.deepcopy(model), loss_fn, device="cpu", **shape)
            if name == "masked":
                # Its base and student share weights: the autograd engine sums their
                # channels_last gradients through a few more copies on meta than on the
                # CPU (3 of 330 calls). The FLOPs and the convs are the same.
                for kind in ("calls", "elements"):
                    assert counted[kind]["other"] == pytest.approx(ran[kind]["other"], rel=0.01)
                    counted[kind]["other"] = ran[kind]["other"]
                counted["most_called"] = ran["most_called"]
            assert counted == ran, (name, channels_last)
    # FLOPs by hand for the one part every provider shares: the stem conv's forward,
    # 7x7 stride 2 on 32 px, 3 -> 64 channels, batch 2 (its backward has no dgrad).
    stem = 2 * 2 * 16 * 16 * 64 * 3 * 49
    assert census(copy.deepcopy(providers["base"][0].conv1), lambda y, _: y.sum(), batch_size=2,
                  image_size=32, num_classes=10, channels_last=False)["flops"] == {
        "forward": stem, "backward": stem, "total": 2 * stem}
