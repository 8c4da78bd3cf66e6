"""AdjoinedLoss against a hand-written formula, profile against hand counts, export round trips."""

import copy
import json
import math
import pathlib
import re
import shutil
import sys

import pytest
import torch
import torchvision
from torch import nn

import anfast
from anfast.adjoin import AdjoinedOutput
from anfast.export import ExportError
from anfast.loss import (OneNetworkLoss, constant_lambda, distillation_loss, get_lambda_schedule, linear_lambda,
                         paper_lambda)

from helpers import assert_close_rel


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


def test_loss_refuses_a_lambda_outside_0_1_and_never_reads_a_tensor_one():
    torch.manual_seed(0)
    base, student = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64)
    target = torch.tensor([0, 3, 9, 2])
    out = AdjoinedOutput(base, (student,))
    for lambda_ in (float("nan"), float("inf"), -1.0, 1.5):
        with pytest.raises(ValueError, match=rf"^lambda_={lambda_}: must be a finite number in \[0, 1\]; "
                                             r"the schedules of anfast.loss give such values$"):
            anfast.AdjoinedLoss()(out, target, lambda_)
    # The CUDA-graph loop passes a device tensor (Stepper.lambda_on_device): reading it would
    # synchronise every step. On meta, any read of a value raises.
    meta = AdjoinedOutput(torch.randn(4, 10, device="meta"), (torch.randn(4, 10, device="meta"),))
    loss = anfast.AdjoinedLoss()(meta, target.to("meta"), torch.tensor(0.5, device="meta"))
    assert loss.shape == () and loss.is_meta
    # By hand: CE on the base + lambda * mean_batch sum_k p_b (log p_b - log p_s).
    p_b, p_s = torch.softmax(base, 1), torch.softmax(student, 1)
    expected = float(nn.functional.nll_loss(p_b.log(), target) + 0.5 * (p_b * (p_b.log() - p_s.log())).sum() / 4)
    assert float(anfast.AdjoinedLoss()(out, target, torch.tensor(0.5, dtype=torch.float64))) == pytest.approx(
        expected, rel=1e-12)


@pytest.mark.parametrize("make, message", [
    pytest.param(lambda: anfast.AdjoinedLoss(temperature=float("nan")),
                 r"temperature=nan: must be a finite number in \(0, inf\)", id="AdjoinedLoss-temperature-nan"),
    pytest.param(lambda: anfast.AdjoinedLoss(temperature=0.0),
                 r"temperature=0.0: must be a finite number in \(0, inf\)", id="AdjoinedLoss-temperature-0"),
    pytest.param(lambda: anfast.AdjoinedLoss(label_smoothing=-0.1),
                 r"label_smoothing=-0.1: must be a finite number in \[0, 1\] \(what F.cross_entropy takes\)",
                 id="AdjoinedLoss-label_smoothing-negative"),
    pytest.param(lambda: anfast.AdjoinedLoss(label_smoothing=1.5),
                 r"label_smoothing=1.5: must be a finite number in \[0, 1\] \(what F.cross_entropy takes\)",
                 id="AdjoinedLoss-label_smoothing-above-1"),
    pytest.param(lambda: anfast.AdjoinedLoss(student_ce_weight=float("nan")),
                 r"student_ce_weight=nan: must be a finite number in \[0, inf\)",
                 id="AdjoinedLoss-student_ce_weight-nan"),
    pytest.param(lambda: OneNetworkLoss("student", temperature=float("inf")),
                 r"temperature=inf: must be a finite number in \(0, inf\)", id="OneNetworkLoss-temperature-inf"),
    pytest.param(lambda: OneNetworkLoss("student", distill_weight=float("nan")),
                 r"distill_weight=nan: must be a finite number in \[0, 1\]", id="OneNetworkLoss-distill_weight-nan"),
    pytest.param(lambda: OneNetworkLoss("base", label_smoothing=-0.1),
                 r"label_smoothing=-0.1: must be a finite number in \[0, 1\] \(what F.cross_entropy takes\)",
                 id="OneNetworkLoss-label_smoothing-negative"),
    pytest.param(lambda: distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]),
                                           temperature=float("nan")),
                 r"temperature=nan: must be a finite number in \(0, inf\)", id="distillation_loss-temperature-nan"),
    pytest.param(lambda: distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]), weight=-0.5),
                 r"weight=-0.5: must be a finite number in \[0, 1\]", id="distillation_loss-weight-negative"),
])
def test_loss_options_must_be_finite_and_in_range(make, message):
    with pytest.raises(ValueError, match=rf"^{message}$"):
        make()


def test_label_smoothing_takes_what_cross_entropy_takes():
    base, target = torch.randn(3, 5, dtype=torch.float64), torch.tensor([0, 4, 2])
    loss = anfast.AdjoinedLoss(label_smoothing=1.0)(AdjoinedOutput(base, (base.clone(),)), target, 1.0)
    # label smoothing 1: the target is uniform, so the CE is the mean over classes of -log p.
    assert float(loss) == pytest.approx(float(-torch.log_softmax(base, 1).mean()), rel=1e-12)


def test_loss_refuses_logits_that_are_not_batch_by_classes_of_one_shape():
    base, target = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"^students\[1\] logits of shape \(10,\): must have the base's shape "
                                         r"\(4, 10\)$"):
        anfast.AdjoinedLoss()(AdjoinedOutput(base, (torch.randn(4, 10), torch.randn(10))), target, 0.5)
    # (N, C, H, W): the CE would be over dim 1, the KL over W.
    dense = AdjoinedOutput(torch.randn(2, 10, 4, 4), (torch.randn(2, 10, 4, 4),))
    with pytest.raises(ValueError, match=r"^base logits of shape \(2, 10, 4, 4\): must be 2-D \(batch, classes\); "
                                         r"for dense predictions, move the classes last and flatten the rest$"):
        anfast.AdjoinedLoss()(dense, torch.randint(0, 10, (2, 4, 4)), 0.5)
    with pytest.raises(ValueError, match=r"^student logits of shape \(1, 10\): must have the teacher's shape "
                                         r"\(4, 10\)$"):
        distillation_loss(torch.randn(1, 10), base, target)


@pytest.mark.parametrize("schedule, by_hand", [
    (paper_lambda, {0.0: 0.0, 0.25: 0.25, 0.5: 1.0, 1.0: 1.0}),
    (linear_lambda, {0.0: 0.0, 0.25: 0.5, 0.5: 1.0, 1.0: 1.0}),
    (constant_lambda, {0.0: 1.0, 0.25: 1.0, 1.0: 1.0}),
])
def test_lambda_schedules_take_progress_in_0_1(schedule, by_hand):
    for progress in (-0.5, -1, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"^progress={progress}: must be a finite number in \[0, 1\]; "
                                             r"pass the fraction of training done, e / E$"):
            schedule(progress)
    assert {progress: schedule(progress) for progress in by_hand} == by_hand
    # The training loop's values: epoch / epochs for epoch in range(epochs).
    assert all(0 <= schedule(epoch / 7) <= 1 for epoch in range(7))


def test_profile_counts_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(8 * 5 * 5, 4))
    stats = anfast.profile(model, (3, 5, 5))
    assert stats["params"] == 8 * 3 * 9 + 200 * 4 + 4
    assert stats["flops"] == 2 * (8 * 25 * 3 * 9) + 2 * (200 * 4)


def _modes(module: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in module.named_modules()}


def test_counting_evaluating_and_adjoining_leave_each_submodule_in_its_own_mode():
    """A network training with one stage frozen in eval (fine-tuning): counting, evaluating
    or adjoining it must not put the frozen BatchNorms back in training, nor train the
    others after an error."""
    from anfast.dan import CostModel, SearchSpace
    from anfast.train.evaluate import evaluate

    model = torchvision.models.resnet18(num_classes=5).train()
    model.layer1.eval()
    expected = _modes(model)
    assert not expected["layer1.0.bn1"] and expected["layer2.0.bn1"]
    anfast.profile(model, (3, 16, 16))
    assert _modes(model) == expected
    with pytest.raises(RuntimeError):  # 4 image channels for a 3-channel stem
        anfast.profile(model, (4, 16, 16))
    assert _modes(model) == expected
    an = anfast.adjoin(model, alpha=1, policy="all", input_size=(3, 16, 16))  # a search network
    assert _modes(model) == expected
    an.layer1.eval()
    expected = _modes(an)
    CostModel(an, SearchSpace.from_network(an, choices=(1, 2, 4)), (3, 16, 16))
    assert _modes(an) == expected
    batches = [(torch.randn(2, 3, 16, 16), torch.tensor([0, 4]))]
    evaluate(an, batches, torch.device("cpu"))
    assert _modes(an) == expected


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_student_loads_in_the_dtype_it_was_saved_in(tmp_path, dtype):
    """load_state_dict copies into the float32 the class builds: a float64 export came
    back float32 (and refused float64 inputs), a bfloat16 one at twice its size."""
    torch.manual_seed(0)
    an = anfast.adjoin("resnet18", alpha=4, policy="paper", num_classes=5, input_size=(3, 16, 16)).to(dtype).eval()
    student = anfast.export_student(an, path=tmp_path)
    loaded = anfast.load_student(tmp_path)
    for (name, saved), (_, got) in zip(student.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert got.dtype == saved.dtype and torch.equal(got, saved), name
    x = torch.randn(2, 3, 16, 16, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(loaded(x), student(x))


def test_a_user_class_loads_in_the_saved_dtype_with_its_tied_weights_tied(tmp_path):
    """Its non-persistent buffer, in no file, follows the saved dtype too."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.bn = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3), nn.BatchNorm2d(16)
            self.fc = nn.Linear(16, 4)
            self.head = self.fc  # one Linear under two names
            self.register_buffer("mean", torch.tensor([0.5, -0.25, 2.0]).view(1, 3, 1, 1), persistent=False)

        def forward(self, x):
            x = self.bn(self.conv2(self.conv1(x - self.mean)))
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    torch.manual_seed(0)
    an = anfast.adjoin(Tied(), alpha=2, policy="all", input_size=(3, 8, 8)).double().eval()
    assert an.layer_widths["conv2"].student_in == (8,)
    anfast.export_student(an, path=tmp_path)
    loaded = anfast.load_student(tmp_path, model=Tied())
    assert loaded.head.weight is loaded.fc.weight and loaded.fc.weight.dtype == loaded.mean.dtype == torch.float64
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert_close_rel(loaded(x), an(x).student, 1e-12)


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
                counted["most_called"], counted["most_elements"] = ran["most_called"], ran["most_elements"]
            assert counted == ran, (name, channels_last)
    # FLOPs by hand for the one part every provider shares: the stem conv's forward,
    # 7x7 stride 2 on 32 px, 3 -> 64 channels, batch 2 (its backward has no dgrad).
    stem = 2 * 2 * 16 * 16 * 64 * 3 * 49
    assert census(copy.deepcopy(providers["base"][0].conv1), lambda y, _: y.sum(), batch_size=2,
                  image_size=32, num_classes=10, channels_last=False)["flops"] == {
        "forward": stem, "backward": stem, "total": 2 * stem}


@pytest.fixture(scope="module")
def resnet18_student(tmp_path_factory):
    """A resnet18 student (10 classes, 32 px) exported once, for the tests that edit it."""
    path = tmp_path_factory.mktemp("export") / "student"
    anfast.export_student(anfast.adjoin("resnet18", alpha=4, num_classes=10, input_size=(3, 32, 32)), path=path)
    return path


@pytest.mark.parametrize("layer, key, value, model_has", [
    ("layer4.0.conv1", "stride", [1, 1], [2, 2]),
    ("layer3.0.conv2", "padding", [2, 2], [1, 1]),
    ("layer4.0.bn1", "eps", 0.001, 1e-05),
])
def test_load_student_refuses_an_edited_layer_naming_the_file_and_key(resnet18_student, tmp_path, layer, key, value,
                                                                       model_has):
    path = shutil.copytree(resnet18_student, tmp_path / "student")
    config = json.loads((path / "config.json").read_text())
    config["layers"][layer][key] = value
    (path / "config.json").write_text(json.dumps(config))
    message = (rf"^{re.escape(str(path / 'config.json'))}: layers\.{re.escape(layer)}\.{key}: "
               rf"{re.escape(repr(value))} in the export, {re.escape(repr(model_has))} in the ResNet; ")
    # Built from config.json's own source, the advice to pass another architecture would be wrong.
    with pytest.raises(ExportError, match=message + r"the export is damaged or was edited; re-export the network$"):
        anfast.load_student(path)
    with pytest.raises(ExportError, match=message + r"pass the architecture the network was exported from$"):
        anfast.load_student(path, model=torchvision.models.resnet18(num_classes=10))


def test_export_refuses_a_plain_network_an_index_that_is_not_a_whole_number_and_a_file_for_a_folder(tmp_path):
    for export in (anfast.export_student, anfast.export_base):
        with pytest.raises(TypeError, match=rf"^{export.__name__} takes an adjoined network, got a ResNet; "
                                            r"pass what anfast.adjoin\(model\) returns$"):
            export(torchvision.models.resnet18(num_classes=10))
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
    an = anfast.adjoin(model, alpha=2, policy="all", input_size=(3, 8, 8)).eval()
    for index in ("0", 0.0, True):
        with pytest.raises(TypeError, match=rf"^index={re.escape(repr(index))}: must be a whole number, the "
                                            r"student's position \(0 to 0\)$"):
            anfast.export_student(an, index)
    file = tmp_path / "a_file"
    file.write_text("x")
    for export, path in ((anfast.export_student, file), (anfast.export_base, file / "base")):
        with pytest.raises(NotADirectoryError, match=rf"^path={re.escape(repr(str(path)))}: {re.escape(str(file))} "
                                                     r"is not a folder; pass a folder, which will hold "
                                                     r"model.safetensors and config.json$"):
            export(an, path=path)
    assert file.read_text() == "x"
