"""The training step that never waits on the host: device-side sums and skips, host reads
only at log points, --data synthetic, --compile modes (issue 16)."""

from __future__ import annotations

import argparse
import copy
import functools
import json

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

import anfast.train.loop as loop
from anfast.runs.checkpoint import load_checkpoint
from anfast.cli.train import add_train_arguments, config_from_args
from anfast.train.config import ConfigError, TrainConfig
from anfast.train.loop import NonFiniteLossError, fit
import anfast
from anfast.train.step import StepMeter, ema_update, optimizer_step, resolve_compile, train_step
from helpers import HostReads, one_thread
from test_train_config import make_image_folder, tiny_config


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return config_from_args(parser.parse_args(argv))


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("argv, expected", [
    ([], False),
    (["--compile"], "default"),
    (["--compile", "reduce-overhead"], "reduce-overhead"),
    (["--compile", "max-autotune"], "max-autotune"),
    (["--no-compile"], False),
])
def test_compile_flag_takes_a_mode(argv, expected):
    assert _parse(argv).compile == expected


@pytest.mark.parametrize("text, expected", [("true", True), ("false", False),
                                            ("reduce-overhead", "reduce-overhead")])
def test_compile_from_yaml_and_no_compile_overrides_it(tmp_path, text, expected):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"compile: {text}\n")
    assert _parse(["--config", str(yaml_file)]).compile == expected
    assert _parse(["--config", str(yaml_file), "--no-compile"]).compile is False


def test_bad_compile_mode_and_num_classes_with_a_folder_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"compile='fast'; choose one of"):
        TrainConfig(compile="fast").validate()
    with pytest.raises(ConfigError, match=r"--num-classes 10 applies to --data synthetic only"):
        TrainConfig(data=str(tmp_path), num_classes=10).validate()
    with pytest.raises(ConfigError, match=r"log_interval=0 must be >= 1"):
        TrainConfig(log_interval=0).validate()
    TrainConfig(data="synthetic", num_classes=10).validate()


def test_reduce_overhead_falls_back_on_the_cpu_with_one_line():
    mode, message = resolve_compile("reduce-overhead", torch.device("cpu"))
    assert mode == "default" and "\n" not in message and "CUDA graphs" in message
    assert resolve_compile("max-autotune", torch.device("cpu")) == ("max-autotune", None)
    assert resolve_compile(None, torch.device("cpu")) == (None, None)


# ----------------------------------------------------------------------------- step parts


def test_step_meter_sums_match_hand_computed_values():
    meter = StepMeter(torch.device("cpu"), max_bad_steps=1, step=10, bad_steps=0, loss_sum=1.5,
                      grad_norm_sum=2.0, good_steps=1)
    nan = float("nan")
    for loss, norm in ((2.0, 3.0), (nan, 1.0), (4.0, float("inf")), (1.0, 1.0)):
        loss, norm = torch.tensor(loss), torch.tensor(norm)
        bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
        meter.add(loss, norm, bad)
    values = meter.read()
    # Good steps 11 and 14 add to the resumed sums; bad steps 12 and 13 add nothing, and
    # the second bad one (step 13) is the first above max_bad_steps=1.
    assert values["loss_sum"] == 1.5 + 2.0 + 1.0
    assert values["grad_norm_sum"] == 2.0 + 3.0 + 1.0
    assert (values["good_steps"], values["bad_steps"], values["step"]) == (3, 2, 14)
    assert values["failed_at"] == 13
    assert values["recent_loss"] == pytest.approx(3.0 / 2) and values["recent_grad_norm"] == 2.0
    meter.add(torch.tensor(5.0), torch.tensor(7.0), torch.tensor(False))
    assert meter.read()["recent_loss"] == 5.0


@pytest.mark.parametrize("cls, kwargs", [(torch.optim.AdamW, {"weight_decay": 0.1}),
                                         (torch.optim.SGD, {"momentum": 0.9, "weight_decay": 0.1})])
def test_skipped_optimizer_step_leaves_weights_and_state_alone(cls, kwargs):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(5))
    optimizer = cls([param], lr=0.1, fused=True, **kwargs)
    param.grad = torch.randn(5)
    optimizer_step(optimizer, torch.tensor(False))
    before = (param.detach().clone(), copy.deepcopy(optimizer.state_dict()))
    param.grad = torch.full((5,), float("nan"))
    optimizer_step(optimizer, torch.tensor(True))
    assert torch.equal(param.detach(), before[0])
    state, state_before = optimizer.state_dict()["state"][0], before[1]["state"][0]
    assert state.keys() == state_before.keys()
    for key in state:
        assert torch.equal(state[key], state_before[key]), key
    param.grad = torch.ones(5)
    optimizer_step(optimizer, torch.tensor(False))
    assert not torch.equal(param.detach(), before[0])
    assert not hasattr(optimizer, "found_inf")


def _conv_net() -> torch.nn.Module:
    """A CNN without BatchNorm: its gradient over a batch is the mean of its micro-batches'."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, stride=2),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 5))
    return anfast.adjoin(net, alpha=2, policy="all", input_size=(3, 8, 8)).double()


def _step(model, batches, *, accumulate, clip_grad=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    meter = StepMeter(torch.device("cpu"), max_bad_steps=0, step=0)
    (images, labels), *more = batches
    train_step(model, images, labels, loss_fn=functools.partial(anfast.AdjoinedLoss(), lambda_=0.7),
               optimizer=optimizer, scaler=torch.amp.GradScaler("cpu", enabled=False),
               parameters=list(model.parameters()), amp_dtype=None, clip_grad=clip_grad, meter=meter,
               more_batches=iter(more), accumulate=accumulate)
    return meter.read()


@pytest.mark.parametrize("clip_grad", [None, 0.05])
def test_accumulated_micro_batches_step_as_one_batch_in_float64(clip_grad):
    """Three micro-batches of 4 accumulated = one step on the 12 images (mean-reduced
    loss, no BatchNorm): the same weights, loss and gradient norm, clipped or not."""
    torch.manual_seed(1)
    images = torch.randn(12, 3, 8, 8, dtype=torch.float64)
    labels = torch.randint(5, (12,))
    whole, accumulated = _conv_net(), _conv_net()
    one = _step(whole, [(images, labels)], accumulate=1, clip_grad=clip_grad)
    three = _step(accumulated, [(images[i:i + 4], labels[i:i + 4]) for i in (0, 4, 8)], accumulate=3,
                  clip_grad=clip_grad)
    assert three["loss_sum"] == pytest.approx(one["loss_sum"], rel=1e-12)
    assert three["grad_norm_sum"] == pytest.approx(one["grad_norm_sum"], rel=1e-12)
    assert three["good_steps"] == one["good_steps"] == 1
    for (name, after_whole), after_accumulated in zip(whole.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(after_accumulated, after_whole, rtol=1e-12, atol=1e-14, msg=name)
    # The step moved the weights: the comparison is not between two untouched networks.
    assert not torch.equal(next(whole.parameters()), next(_conv_net().parameters()))


def test_accumulate_must_match_the_micro_batches_given():
    images, labels = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="1 micro-batch\\(es\\), but accumulate=2"):
        _step(_conv_net(), [(images, labels)], accumulate=2)
    with pytest.raises(ValueError, match="more micro-batches than accumulate=1"):
        _step(_conv_net(), [(images, labels)] * 2, accumulate=1)


def test_accum_steps_flag_and_its_bounds():
    assert _parse(["--accum-steps", "4"]).accum_steps == 4
    assert TrainConfig().accum_steps == 1
    with pytest.raises(ConfigError, match="accum_steps=0 must be >= 1"):
        TrainConfig(accum_steps=0).validate()


def test_ema_update_matches_the_formula_in_float64_and_skips():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = AveragedModel(model, use_buffers=True)
    decay = 0.75
    skip, keep = torch.tensor(True), torch.tensor(False)
    ema_update(ema, model, skip, decay=decay)  # a skipped first update: nothing, not even the copy
    assert int(ema.n_averaged) == 0
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema_update(ema, model, keep, decay=decay)  # the first real one copies
    assert torch.equal(ema.module[0].weight, model[0].weight) and int(ema.n_averaged) == 1
    expected = {name: tensor.double() for name, tensor in ema.module.state_dict().items()}
    with torch.no_grad():
        model[0].weight.mul_(3.0)
        model[1].running_mean.add_(2.0)
        model[1].num_batches_tracked.add_(10)
    current = model.state_dict()
    ema_update(ema, model, keep, decay=decay)
    for name, value in ema.module.state_dict().items():
        want = decay * expected[name] + (1 - decay) * current[name].double()
        if name.endswith("num_batches_tracked"):
            assert torch.equal(value, current[name]), name  # an integer buffer is copied, not averaged
        else:
            torch.testing.assert_close(value.double(), want, rtol=1e-6, atol=1e-7)
    # An index buffer stays what it is: averaged and truncated, [0..6] drifted within 50 updates.
    index = torch.randperm(7)
    model.register_buffer("order", index.clone())
    ema.module.register_buffer("order", index.clone())
    for _ in range(50):
        ema_update(ema, model, keep, decay=0.9995)
    assert torch.equal(ema.module.order, index)
    snapshot = copy.deepcopy(ema.state_dict())
    ema_update(ema, model, skip, decay=decay)
    for name, value in ema.state_dict().items():
        assert torch.equal(value, snapshot[name]), name


# ----------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"))


# A 12-step run (24 images, batch 6: 4 steps per epoch, 3 epochs; SGD, EMA, clipping,
# a log point every 10 steps: step 10 is one, between two epoch ends). SGD at lr 0.01 keeps a rounding difference small, where
# batch-6 AdamW at lr 1e-3 grows a 1e-6 difference to 7% in 8 steps.
_RUN = dict(epochs=3, batch_size=6, optimizer="sgd", lr=0.01, workers=1, ema=True, ema_decay=0.5, clip_grad=1.0,
            log_interval=10)


def _losses(run_dir) -> list[list[float]]:
    """Per epoch of a run: train loss, base val loss, student val loss."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [[row["train_loss"], row["base"]["loss"], row["student"]["loss"]] for row in rows]


def _fit_on_one_thread(config) -> None:
    # Both runs on one thread (helpers.one_thread). workers=1: the augmentations' host
    # reads of CPU random numbers are the worker's.
    with one_thread():
        fit(config)


@pytest.mark.slow
def test_steps_read_nothing_on_the_host_between_log_points(data, tmp_path, monkeypatch):
    # The reference: the same run with nothing counted, in this process and torch.
    _fit_on_one_thread(tiny_config(data, tmp_path / "reference", **_RUN))
    reads = HostReads(monkeypatch, loop, "_summary", "summary")  # profiles and exports after training
    run_dir = tmp_path / "run"
    _fit_on_one_thread(tiny_config(data, run_dir, **_RUN))
    assert reads.steps == 12
    per_step = reads.per_step()
    assert not [key for key in per_step if key[0] == "in step"], per_step
    epoch_ends = {4, 8, 12}
    log_points = {10}
    for (_, step_number), count in per_step.items():
        assert step_number in epoch_ends | log_points, per_step
        if step_number not in epoch_ends:
            assert count == 1, per_step  # the StepMeter read
        else:
            assert count <= 6, per_step  # meter, loader order, evaluation, skipped images
    # The reads that must be there: a counter that saw nothing would pass the bounds above.
    assert per_step.get(("after step", 10)) == 1, per_step
    assert all(per_step.get(("after step", n), 0) >= 2 for n in epoch_ends), per_step
    # Counting the reads changed nothing the run computes: the same losses, bit for bit.
    assert _losses(run_dir) == _losses(tmp_path / "reference")


class _NaNGradient(torch.autograd.Function):
    """Identity forward; NaN gradients backward: one poisoned step with a finite loss."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def _poison_step(monkeypatch, bad_step: int) -> None:
    """Give step ``bad_step`` NaN gradients (through the loss the loop builds)."""
    original = loop.AdjoinedLoss.forward
    calls = [0]

    def forward(self, output, target, lambda_):
        calls[0] += 1
        loss = original(self, output, target, lambda_)
        return _NaNGradient.apply(loss) if calls[0] == bad_step else loss

    monkeypatch.setattr(loop.AdjoinedLoss, "forward", forward)


@pytest.mark.slow
def test_a_nan_gradient_step_is_skipped_as_if_the_batch_never_reached_the_optimizer(
        data, tmp_path, monkeypatch):
    bad_step = 5  # the second step of epoch 2 (3 steps per epoch)
    config = dict(epochs=2, max_bad_steps=1, clip_grad=1.0)
    with monkeypatch.context() as patch:
        _poison_step(patch, bad_step)
        summary = fit(tiny_config(data, tmp_path / "skipped", **config))
    assert summary["bad_steps"] == 1 and summary["steps"] == 6

    # Reference: the optimizer is simply not called for that batch.
    with monkeypatch.context() as patch:
        original, calls = torch.optim.AdamW.step, [0]

        def step(self, *args, **kwargs):
            calls[0] += 1
            return None if calls[0] == bad_step else original(self, *args, **kwargs)

        patch.setattr(torch.optim.AdamW, "step", step)
        fit(tiny_config(data, tmp_path / "reference", **config))
    got = load_checkpoint(tmp_path / "skipped" / "checkpoints" / "last.pt")
    want = load_checkpoint(tmp_path / "reference" / "checkpoints" / "last.pt")
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    for index, state in want["optimizer"]["state"].items():
        for key, tensor in state.items():
            assert torch.equal(got["optimizer"]["state"][index][key], tensor), (index, key)

    # With no bad step allowed, the run stops at the next read and names the step and
    # the checkpoint written after epoch 1.
    with monkeypatch.context() as patch:
        _poison_step(patch, bad_step)
        run_dir = tmp_path / "stopped"
        with pytest.raises(NonFiniteLossError, match=rf"^step {bad_step} \(epoch 2\): .* 1 bad step"
                                                     rf".*the last good checkpoint is .*last\.pt"):
            fit(tiny_config(data, run_dir, **dict(config, max_bad_steps=0)))
    assert (run_dir / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow
def test_synthetic_data_trains_and_reduce_overhead_falls_back_on_the_cpu(tmp_path, monkeypatch,
                                                                          capsys):
    compiled = []

    def fake_compile(model, **kwargs):  # the CPU cannot afford inductor here; record the call
        compiled.append(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    config = TrainConfig(data="synthetic", num_classes=10, synthetic_steps=3, batch_size=4,
                         image_size=16, epochs=1, out=str(tmp_path / "run"), device="cpu",
                         compile="reduce-overhead", log_interval=2)
    summary = fit(config)
    assert compiled == [{"mode": "default"}]
    out = capsys.readouterr().out
    assert out.count("--compile reduce-overhead records CUDA graphs") == 1
    assert summary["steps"] == 3 and summary["loader"] == "synthetic"
    assert 0 <= summary["base"]["top1"] <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_reduce_overhead_trains_with_cuda_graphs_on_the_gpu(tmp_path):
    config = TrainConfig(data="synthetic", num_classes=10, synthetic_steps=6, batch_size=8,
                         image_size=32, epochs=2, out=str(tmp_path / "run"), device="cuda",
                         channels_last=True, compile="reduce-overhead", log_interval=4)
    summary = fit(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 12 and summary["bad_steps"] == 0
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in rows)
