"""--cuda-graphs (anfast.train.graphs): what a captured step must read from the device and
restore after its warm-up, checked on the CPU; capture and replay on a GPU."""

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import anfast
from anfast.train.graphs import (CapturedStep, set_learning_rate, step_state_tensors, tensor_learning_rates,
                                 undo_warm_up)
from anfast.loss import AdjoinedLoss
from anfast.train.step import StepMeter, ema_update, train_step

from helpers import assert_close_rel, small_resnet


class WriteRecorder(TorchDispatchMode):
    """Storages each op writes in place, and storages the step itself allocated (kept
    alive, so an address names one storage)."""

    def __init__(self):
        super().__init__()
        self.written, self.allocated, self.alive = set(), set(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        schema_args = func._schema.arguments
        values = list(args) + [kwargs.get(a.name) for a in schema_args[len(args):]] if kwargs else list(args)
        for argument, value in zip(schema_args, values):
            if argument.alias_info is not None and argument.alias_info.is_write:
                for t in tree_leaves(value):
                    if isinstance(t, torch.Tensor):
                        self.written.add(t.untyped_storage().data_ptr())
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        self.alive.append(out)
        for t in tree_leaves(out):  # a new storage, not a view or an in-place result
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.allocated.add(t.untyped_storage().data_ptr())
        return out


def _training_objects(optimizer_name):
    torch.manual_seed(0)
    # The torch backend, as auto runs it on the CPU: on a GPU auto would tune every conv
    # inside the eager run first (the lease's time, and a backend choice left to timing).
    # A two-block ResNet (helpers.small_resnet): a step's every kind of state (conv, norm and
    # linear weights, running statistics, optimizer state, EMA, meter) at a third of ResNet-18's ops.
    an = anfast.adjoin(small_resnet(5), alpha=4, policy="all", input_size=(3, 16, 16), backend="torch")
    decay = [p for p in an.parameters() if p.ndim > 1]
    rest = [p for p in an.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": 1e-4}, {"params": rest, "weight_decay": 0.0}]
    optimizer = (torch.optim.SGD(groups, lr=0.1, momentum=0.9, fused=True) if optimizer_name == "sgd"
                 else torch.optim.AdamW(groups, lr=1e-3, fused=True))
    for p in decay + rest if optimizer_name == "sgd" else ():
        optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    ema = torch.optim.swa_utils.AveragedModel(
        an, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9), use_buffers=True)
    meter = StepMeter(torch.device("cpu"), max_bad_steps=0, step=0)
    return an, optimizer, ema, meter


def _step(an, optimizer, ema, meter, lambda_):
    return functools.partial(
        train_step, an, loss_fn=lambda out, target: AdjoinedLoss()(out, target, lambda_),
        optimizer=optimizer, scaler=torch.amp.GradScaler("cpu", enabled=False),
        parameters=list(an.parameters()), amp_dtype=None, clip_grad=1.0,
        update_ema=functools.partial(ema_update, ema, an, decay=0.9), meter=meter)


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_every_tensor_a_step_writes_is_restored_after_the_warm_up(optimizer_name):
    """A step after the first (optimizer state exists) under a recorder: every storage it
    writes in place that it did not allocate itself must be in step_state_tensors."""
    an, optimizer, ema, meter = _training_objects(optimizer_name)
    tensor_learning_rates(optimizer, torch.device("cpu"))
    lambda_ = torch.tensor(0.5)
    step = _step(an, optimizer, ema, meter, lambda_)
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 4])
    step(images, labels)
    recorder = WriteRecorder()
    with recorder:
        step(images, labels)
    restored = {t.untyped_storage().data_ptr() for t in step_state_tensors(an, optimizer, ema, meter)}
    missing = recorder.written - recorder.allocated - restored
    assert not missing, f"{len(missing)} written storages would keep the warm-up's values"


def test_a_tensor_learning_rate_and_lambda_give_the_steps_of_floats():
    """What the captured step reads from the device equals what the eager step bakes in."""
    runs = []
    for as_tensor in (False, True):
        an, optimizer, ema, meter = _training_objects("sgd")
        lambda_ = torch.tensor(0.5) if as_tensor else 0.5
        if as_tensor:
            tensor_learning_rates(optimizer, torch.device("cpu"))
        step = _step(an, optimizer, ema, meter, lambda_)
        for lr in (0.1, 0.05):
            set_learning_rate(optimizer, lr)
            step(torch.ones(4, 3, 16, 16), torch.tensor([0, 1, 2, 4]))
        runs.append([p.detach().clone() for p in an.parameters()])
    for eager, tensor_lr in zip(*runs):
        assert torch.equal(eager, tensor_lr)


def _state(objects):
    an, optimizer, ema, meter = objects
    return (list(an.state_dict().values()) + list(ema.state_dict().values())
            + [v for state in optimizer.state.values() for v in state.values()] + list(meter.state_tensors()))


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_steps_after_an_undone_warm_up_are_the_steps_of_a_fresh_start(optimizer_name):
    """Three warm-up steps on the first batch, undone, then three steps: the weights, BatchNorm
    statistics, EMA, meter sums and optimizer state of three steps from a fresh start. On a
    fresh run AdamW creates its moments and step count in its first step, inside the warm-up."""
    torch.manual_seed(1)
    batches = [(torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))) for _ in range(3)]
    results = []
    for warmed_up in (False, True):
        objects = _training_objects(optimizer_name)
        step = _step(*objects, lambda_=0.5)
        if warmed_up:
            undo_warm_up(lambda: [step(*batches[0]) for _ in range(3)],
                         functools.partial(step_state_tensors, *objects))
        for batch in batches:
            step(*batch)
        results.append(_state(objects))
    fresh, warmed = results
    assert len(fresh) == len(warmed)
    for a, b in zip(fresh, warmed):
        if a.is_floating_point():
            assert_close_rel(b, a, 1e-6)
        else:
            assert torch.equal(a, b)


class _Capturing:
    """A current stream that says it is capturing, for torch's optimizer capture check."""

    def is_capturing(self):
        return True


def test_adamw_with_tensor_learning_rates_passes_torch_s_capture_check(monkeypatch):
    """torch's Adam / AdamW refuse a step inside a CUDA graph capture unless every param
    group is capturable; tensor_learning_rates sets that (also on a resumed optimizer)."""
    an, optimizer, _, _ = _training_objects("adamw")
    for p in an.parameters():
        p.grad = torch.ones_like(p)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "current_stream", lambda device=None: _Capturing())
    with pytest.raises(RuntimeError, match="capturable is False"):  # the check this test stands on
        optimizer.step()
    tensor_learning_rates(optimizer, torch.device("cpu"))
    before = [p.detach().clone() for p in an.parameters()]
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, an.parameters()))


def test_capture_refuses_a_cpu_batch():
    with pytest.raises(ValueError, match="--cuda-graphs needs a CUDA device; the batch is on cpu"):
        CapturedStep(lambda images, labels: None, torch.zeros(2, 3), torch.zeros(2), state=list)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_captured_steps_continue_exactly_like_eager_steps(optimizer_name):
    """Three replays from the state three eager steps started from: the same weights,
    BatchNorm statistics, EMA and meter sums (within bf16-free fp32 rounding); AdamW's
    state is made in the warm-up, SGD's before it."""
    device = torch.device("cuda")
    results = []
    for captured in (False, True):
        an, optimizer, ema, meter = _training_objects(optimizer_name)
        an.to(device), ema.to(device)
        for state in optimizer.state.values():
            state["momentum_buffer"] = state["momentum_buffer"].to(device)
        meter = StepMeter(device, max_bad_steps=0, step=0)
        tensor_learning_rates(optimizer, device)
        lambda_ = torch.tensor(0.5, device=device)
        step = _step(an, optimizer, ema, meter, lambda_)
        torch.manual_seed(1)
        batches = [(torch.randn(8, 3, 16, 16, device=device), torch.randint(0, 5, (8,), device=device))
                   for _ in range(3)]
        if captured:
            step = CapturedStep(step, *batches[0],
                                state=functools.partial(step_state_tensors, an, optimizer, ema, meter))
        for index, batch in enumerate(batches):
            set_learning_rate(optimizer, 0.1 / (index + 1))
            step(*batch)
        torch.cuda.synchronize()
        results.append((list(an.state_dict().values()), list(ema.state_dict().values()), meter.read()))
    (model_1, ema_1, read_1), (model_2, ema_2, read_2) = results
    for a, b in zip(model_1 + ema_1, model_2 + ema_2):
        if a.is_floating_point():
            assert_close_rel(b, a, 1e-5)
        else:
            assert torch.equal(a, b)
    assert read_1["step"] == read_2["step"] == 3
    assert abs(read_1["loss_sum"] - read_2["loss_sum"]) <= 1e-5 * abs(read_1["loss_sum"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_captured_run_with_adamw_and_ema_is_the_run_of_eager_steps(tmp_path):
    """`anfast train --cuda-graphs --ema` with AdamW (the default optimizer): the capture
    accepts the optimizer, the EMA's count lives on the GPU, and the run's losses and
    EMA weights are those of eager steps."""
    import json

    from anfast.train.loop import fit
    from test_train_config import make_image_folder, tiny_config

    data = make_image_folder(tmp_path / "data")
    runs = {}
    for graphs in (False, True):
        out = tmp_path / f"graphs_{graphs}"
        summary = fit(tiny_config(data, out, device="cuda", cuda_graphs=graphs, ema=True, epochs=2,
                                  optimizer="adamw", lr=1e-3, backend="torch"))  # nothing to tune
        assert summary["cuda_graphs"]["mode"] == ("whole step (--cuda-graphs)" if graphs else "off")
        runs[graphs] = [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    for eager, captured in zip(runs[False], runs[True]):
        assert abs(captured - eager) <= 1e-4 * abs(eager), runs
