"""Auto's measured backend choice (anfast.ops.tuning): verification, timing, the cache,
CUDA-graph capture, ANFAST_TUNE=0, distributed agreement, and the CPU training path.

Auto tunes on CUDA devices only; these tests add "cpu" to the tuner's lazy devices
(its one documented seam) so the same path runs on CPU tensors, and inject a timer.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import anfast
from anfast.ops import adjoined_conv2d, adjoined_conv2d_reference, explain, tuning
from anfast.ops.conv import _problem
from anfast.ops.tuning import Tuner, cache_path
from anfast.nn.backends import LayerDecision
from helpers import FakeTimer, StandInBackend, VariantStandIn, assert_close_rel, install_backends

WORKER = Path(__file__).with_name("tuning_worker.py")


def make_inputs(seed=0, batch=3, channels=13, size=7):
    generator = torch.Generator().manual_seed(seed)
    x_base = torch.randn(batch, channels, size, size, generator=generator).requires_grad_()
    x_student = torch.randn(batch, 5, size, size, generator=generator).requires_grad_()
    weight = torch.randn(11, channels, 3, 3, generator=generator).requires_grad_()
    bias = torch.randn(11, generator=generator).requires_grad_()
    return x_base, x_student, weight, bias


def run_op(inputs, **kwargs):
    """Forward and backward through the public op; returns outputs and gradients."""
    for t in inputs:
        t.grad = None
    y_base, y_student = adjoined_conv2d(*inputs, out_student=4, padding=1, **kwargs)
    (y_base.square().sum() + 3 * y_student.sum()).backward()
    return y_base.detach(), y_student.detach(), *(t.grad for t in inputs)


def problem_of(inputs):
    return _problem(*inputs, None, 4, [1, 1], [1, 1], [1, 1], 1)


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    """A CPU-tuning tuner with a cache in tmp_path; its timer is set per test."""
    monkeypatch.setenv("ANFAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ANFAST_BACKEND", raising=False)
    monkeypatch.delenv("ANFAST_TUNE", raising=False)
    fresh = Tuner(timer=FakeTimer({}), lazy_devices=("cpu",))
    previous = tuning.set_tuner(fresh)
    yield fresh
    tuning.set_tuner(previous)


@pytest.mark.parametrize("wrong, message", [
    ("y_student", r"y_student relative error 5\.0\de-01 > tolerance 1e-05"),
    ("dweight", r"dweight relative error .* > tolerance 1e-05"),
    ("nan", r"y_base NaN or inf > tolerance 1e-05"),
])
def test_wrong_backend_is_never_chosen_and_named_once(tuner, monkeypatch, wrong, message):
    bad = StandInBackend("bad", wrong=wrong)
    install_backends(monkeypatch, bad)
    tuner.timer = FakeTimer({"bad": 0.1, "torch": 1.0})  # it would win on speed
    inputs = make_inputs()
    expected = run_op(inputs, backend="torch")
    with pytest.warns(UserWarning, match=r"backend 'bad' failed verification on .*" + message):
        got = run_op(inputs)
    for name, a, b in zip(("y_base", "y_student", "dx_base", "dx_student", "dweight", "dbias"),
                          got, expected):
        assert_close_rel(a, b, 1e-6, name)
    decision = tuner.lookup(problem_of(inputs))
    assert decision.backend == "torch" and not decision.candidates["bad"].verified
    timings, calls = tuner.timer.calls, bad.forward_calls
    with tuning.warnings.catch_warnings():
        tuning.warnings.simplefilter("error")  # logged once: a decided key warns no more
        run_op(inputs)
    assert (tuner.timer.calls, bad.forward_calls) == (timings, calls)


def test_tuning_shows_a_bar_of_the_problems_when_asked_and_nothing_when_not(tuner, monkeypatch, capsys):
    install_backends(monkeypatch, StandInBackend("fast"))
    tuner.timer = FakeTimer({"fast": 0.5, "torch": 1.0})
    problems = [problem_of(make_inputs(seed=0)), problem_of(make_inputs(seed=1, size=9))]
    decided = tuning.tune_problems(problems, ["fast"], progress=True)
    assert [cached for _, cached in decided] == [False, False] and tuner.timer.calls == 4
    bar = capsys.readouterr().err
    assert "anfast: tuning the convs" in bar and "0/2 [" in bar, bar  # total: the 2 problems
    assert [cached for _, cached in tuning.tune_problems(problems, ["fast"], progress=False)] == [True, True]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("fast_ms, chosen", [(0.5, "fast"), (1.5, "torch")])
def test_fastest_verified_backend_wins_and_runs(tuner, monkeypatch, fast_ms, chosen):
    fast = StandInBackend("fast")
    install_backends(monkeypatch, fast)
    tuner.timer = FakeTimer({"fast": fast_ms, "torch": 1.0})
    inputs = make_inputs()
    run_op(inputs)
    decision = tuner.lookup(problem_of(inputs))
    assert decision.backend == chosen
    assert decision.candidates["fast"].verified and decision.candidates["fast"].ms == fast_ms
    assert tuner.timer.calls == 2  # torch and the candidate, once
    calls = fast.forward_calls
    run_op(inputs)
    assert fast.forward_calls == calls + (chosen == "fast")
    assert f"auto: {chosen}: " in explain(problem_of(inputs))


def test_fastest_verified_variant_wins_runs_and_round_trips_the_cache(tuner, monkeypatch):
    # Each variant is a candidate of its own: "wrong" would win on speed and is refused.
    tiles = VariantStandIn("tiles", {"128x128": "", "64x64": "", "wrong": "dweight"})
    install_backends(monkeypatch, tiles)
    tuner.timer = FakeTimer({"torch": 1.0, "tiles:128x128": 0.8, "tiles:64x64": 0.5, "tiles:wrong": 0.1})
    inputs = make_inputs()
    expected = run_op(inputs, backend="torch")
    with pytest.warns(UserWarning, match=r"backend 'tiles:wrong' failed verification on .*dweight"):
        got = run_op(inputs)
    for name, a, b in zip(("y_base", "y_student", "dx_base", "dx_student", "dweight", "dbias"), got, expected):
        assert_close_rel(a, b, 1e-6, name)
    decision = tuner.lookup(problem_of(inputs))
    result = decision.candidates["tiles"]
    assert (decision.backend, decision.variant, result.variant, result.ms) == ("tiles", "64x64", "64x64", 0.5)
    assert {name: r.verified for name, r in result.variants.items()} == \
        {"128x128": True, "64x64": True, "wrong": False}
    assert "variant 64x64" in decision.reason and "tiles:64x64 0.5 ms" in explain(problem_of(inputs))
    assert tuner.timer.calls == 4 and tiles.ran == ["64x64"]  # torch + 3 variants; then the winner ran

    # A fresh process reads the variant back, measures nothing and runs that variant, also
    # when the backend is named; the tune JSON names it.
    reader = Tuner(timer=FakeTimer({}), lazy_devices=("cpu",))
    tuning.set_tuner(reader)
    run_op(inputs)
    run_op(inputs, backend="tiles")
    assert reader.timer.calls == 0 and tiles.ran == ["64x64"] * 3
    row = LayerDecision("conv", problem_of(inputs), reader.lookup(problem_of(inputs)), True)
    assert (row.to_dict()["choice"], row.to_dict()["variant"], row.chosen_ms()) == ("tiles", "64x64", 0.5)


def test_backend_whose_every_variant_fails_is_never_chosen(tuner, monkeypatch):
    tiles = VariantStandIn("tiles", {"a": "y_student", "b": "nan"})
    install_backends(monkeypatch, tiles)
    tuner.timer = FakeTimer({"torch": 1.0, "tiles:a": 0.1, "tiles:b": 0.1})
    inputs = make_inputs()
    with pytest.warns(UserWarning, match="failed verification"):
        run_op(inputs)
    decision = tuner.lookup(problem_of(inputs))
    result = decision.candidates["tiles"]
    assert (decision.backend, decision.variant, result.verified, result.ms) == ("torch", "", False, None)
    assert result.why.startswith("no variant verified: a: y_student relative error")
    assert "b: y_base NaN or inf" in result.why
    run_op(inputs, backend="tiles")
    assert tiles.ran == [""]  # named, with no verified variant: its default


def test_format_1_cache_is_set_aside_and_retuned(tuner, monkeypatch):
    # Before variants a decision timed only a backend's default kernels.
    install_backends(monkeypatch, VariantStandIn("tiles", {"128x128": "", "64x64": ""}))
    tuner.timer = FakeTimer({"torch": 1.0, "tiles:128x128": 0.8, "tiles:64x64": 0.5})
    inputs = make_inputs()
    path = cache_path(torch.device("cpu"))
    path.parent.mkdir(parents=True)
    old = {**tuning._expected_header(torch.device("cpu")), "format": 1, "decisions": {
        tuning.problem_key(problem_of(inputs)): {"backend": "tiles", "reason": "verified", "torch_ms": 1.0,
                                                 "candidates": {"tiles": {"verified": True, "ms": 0.8}}}}}
    path.write_text(json.dumps(old))
    with pytest.warns(UserWarning, match="ignoring tuning cache .*'format': 1"):
        run_op(inputs)
    assert tuner.timer.calls == 3 and tuner.lookup(problem_of(inputs)).variant == "64x64"
    assert json.loads(path.read_text())["format"] == tuning._CACHE_FORMAT



def test_format_2_cache_loads_into_decisions_and_round_trips_byte_for_byte(tuner, monkeypatch):
    """A decisions file as the released code writes it (format 2: sorted keys, indent 1)
    reads into Decision / Candidate records and is written back unchanged."""
    install_backends(monkeypatch, StandInBackend("gemm"), VariantStandIn("tiles", {}), StandInBackend("fast"))
    tiled, untiled = problem_of(make_inputs()), problem_of(make_inputs(channels=16, size=5))
    wrong = "dweight relative error 5.00e-01 > tolerance 1e-05"
    unsupported = "unsupported: kernel size (3, 3)"
    faster = "verified (variant 64x64), 2.00x torch's speed"
    slower = "no verified fused backend is faster than torch"
    header = tuning._expected_header(torch.device("cpu"))
    content = {**header, "decisions": {
        tuning.problem_key(tiled): {"backend": "tiles", "variant": "64x64", "reason": faster, "torch_ms": 1.0,
                                    "candidates": {
            "gemm": {"verified": False, "error": None, "why": unsupported, "ms": None},
            "tiles": {"verified": True, "error": 3e-07, "why": "", "ms": 0.5, "variant": "64x64", "variants": {
                "128x128": {"verified": True, "error": 2e-07, "why": "", "ms": 0.8},
                "64x64": {"verified": True, "error": 3e-07, "why": "", "ms": 0.5},
                "wrong": {"verified": False, "error": 0.5, "why": wrong, "ms": None}}}}},
        tuning.problem_key(untiled): {"backend": "torch", "variant": "", "reason": slower, "torch_ms": 2,
                                      "candidates": {
            "fast": {"verified": True, "error": 0.0, "why": "", "ms": 2.5}}}}}
    path = cache_path(torch.device("cpu"))
    path.parent.mkdir(parents=True)
    written = json.dumps(content, indent=1, sort_keys=True)
    path.write_text(written)

    Candidate = tuning.Candidate
    assert tuner.lookup(tiled) == tuning.Decision(
        backend="tiles", variant="64x64", reason=faster, torch_ms=1.0, candidates={
            "gemm": Candidate(verified=False, ms=None, why=unsupported, error=None),
            "tiles": Candidate(verified=True, ms=0.5, why="", error=3e-07, variant="64x64", variants={
                "128x128": Candidate(verified=True, ms=0.8, why="", error=2e-07),
                "64x64": Candidate(verified=True, ms=0.5, why="", error=3e-07),
                "wrong": Candidate(verified=False, ms=None, why=wrong, error=0.5)})})
    assert tuner.lookup(untiled) == tuning.Decision(
        backend="torch", variant="", reason=slower, torch_ms=2,
        candidates={"fast": Candidate(verified=True, ms=2.5, why="", error=0.0)})
    assert tuning.decided_variant(tiled, "tiles") == "64x64"

    entries = {key: decision.to_json() for key, decision in tuner.table(torch.device("cpu")).items()}
    assert json.dumps({**header, "decisions": entries}, indent=1, sort_keys=True) == written
    tuning._write_cache(path, header, {})  # merges nothing: the file is rewritten as it was
    assert path.read_text() == written


@pytest.mark.parametrize("fused_layout, verified", [("channels_last", True), ("nchw", False)])
def test_output_strides_are_checked_against_torch_in_the_problems_dtype(tuner, monkeypatch,
                                                                         fused_layout, verified):
    # On an H200 (torch 2.11) torch's float64 conv returned NCHW outputs for channels_last
    # inputs, and comparing fused outputs with those strides refused every fused backend.
    # Simulated here: the float64 reference is made NCHW, torch in float32 stays channels_last.
    real_reference = tuning._reference

    def nchw_reference(problem, mask):
        ref = real_reference(problem, mask)
        return tuning._Reference(tuple(y.contiguous() for y in ref.outputs), ref.grads_out, ref.grads)

    class Layout(StandInBackend):
        def forward(self, problem):
            return tuple(y.contiguous(memory_format=torch.channels_last if fused_layout == "channels_last"
                                      else torch.contiguous_format) for y in super().forward(problem))

    monkeypatch.setattr(tuning, "_reference", nchw_reference)
    install_backends(monkeypatch, Layout("fast"))
    tuner.timer = FakeTimer({"fast": 0.5, "torch": 1.0})
    inputs = [t.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
              if t.dim() == 4 else t for t in make_inputs()]
    with tuning.warnings.catch_warnings(record=True) as caught:
        tuning.warnings.simplefilter("always")
        run_op(inputs)
    decision = tuner.lookup(problem_of(inputs))
    assert decision.candidates["fast"].verified is verified
    assert decision.backend == ("fast" if verified else "torch")
    if not verified:
        assert "y_base has strides" in decision.candidates["fast"].why
        assert any("failed verification" in str(w.message) for w in caught)


def test_candidates_are_timed_on_output_gradients_in_their_inputs_layout(monkeypatch):
    """The backward pass a candidate is timed on gets the output gradients the op hands it
    (channels_last for channels_last inputs), also where torch's float64 reference returns
    NCHW outputs (CUDA, torch 2.11): else the timing includes the backend's layout copy."""
    torch_backend = tuning.registry.get_backend("torch")
    real_forward = type(torch_backend).forward
    monkeypatch.setattr(type(torch_backend), "forward",
                        lambda self, problem: tuple(y.contiguous() for y in real_forward(self, problem)))
    inputs = [t.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
              if t.dim() == 4 else t for t in make_inputs()]
    reference = tuning._reference(problem_of(inputs), (True, True, True, True))
    assert all(y.is_contiguous() for y in reference.outputs)  # the simulated NCHW reference
    for grad, x in zip(reference.grads_out, inputs[:2]):
        assert grad.is_contiguous(memory_format=torch.channels_last) and not grad.is_contiguous()
        assert grad.dtype == x.dtype


def test_auto_tries_triton_only_when_anfast_auto_backends_names_it(monkeypatch):
    monkeypatch.delenv("ANFAST_AUTO_BACKENDS", raising=False)
    assert tuning.fused_backend_names() == ["gemm", "cuda"]  # the default: all but tuning.AUTO_OPT_IN
    monkeypatch.setenv("ANFAST_AUTO_BACKENDS", "triton, cuda")
    assert tuning.fused_backend_names() == ["cuda", "triton"]  # priority order
    monkeypatch.setenv("ANFAST_AUTO_BACKENDS", "triton,torch")
    with pytest.raises(ValueError, match=r"ANFAST_AUTO_BACKENDS='triton,torch': torch is not a fused backend"):
        tuning.fused_backend_names()
    from anfast.train.config import ConfigError, TrainConfig
    with pytest.raises(ConfigError, match="ANFAST_AUTO_BACKENDS"):
        TrainConfig().validate()  # refused before any data or model is built
    TrainConfig(backend="torch").validate()  # a named backend does not read it


def test_the_version_is_pyproject_s_before_an_install_has_written_its_metadata(monkeypatch):
    """gpu_check starts tests beside its background `pip install -e .`: anfast imports, and
    decisions are keyed, by the source tree's version until the metadata exists."""
    from importlib import metadata

    from anfast import _version as anfast_version

    installed = metadata.version("anfast")

    def not_yet_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(anfast_version.metadata, "version", not_yet_installed)
    assert anfast_version.version() == installed


def test_decisions_of_another_build_of_the_extension_are_not_read(tuner, monkeypatch, tmp_path):
    """A decision names a kernel variant of one anfast._C build and was timed on its code:
    a rebuilt extension (other variants, other kernels) reads no decision of the old one."""
    install_backends(monkeypatch, StandInBackend("fast"))
    builds = {}
    for name, content in (("a", b"kernels of build a"), ("b", b"kernels of build b")):
        builds[name] = tmp_path / f"_C_{name}.so"
        builds[name].write_bytes(content)
    inputs = make_inputs()
    try:
        for build, timed in (("a", 2), ("b", 2), ("a", 0)):
            monkeypatch.setattr(tuning, "_extension_file", lambda build=build: builds[build])
            tuning.versions.cache_clear()
            digest = hashlib.sha256(builds[build].read_bytes()).hexdigest()
            assert tuning.versions()["kernels"] == digest[:12]
            fresh = Tuner(timer=FakeTimer({"fast": 0.5, "torch": 1.0}), lazy_devices=("cpu",))
            tuning.set_tuner(fresh)
            run_op(inputs)
            assert fresh.timer.calls == timed, build  # b tunes anew; a's file still holds a's
    finally:
        tuning.versions.cache_clear()


def test_a_float32_decision_holds_for_its_tf32_setting_only(tuner, monkeypatch):
    """cuDNN's TF32 convs time the torch backend and a TF32 matmul takes gemm out of the
    fp32 tolerance: turning either setting over tunes a float32 problem anew, turning it
    back reads the first decision, and a bfloat16 key does not hold the setting."""
    install_backends(monkeypatch, StandInBackend("fast"))
    tuner.timer = FakeTimer({"fast": 0.5, "torch": 1.0})
    inputs = make_inputs()
    default = tuning.problem_key(problem_of(inputs))
    run_op(inputs)
    assert tuner.timer.calls == 2
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=tuning.fp32_precision("conv") != "tf32"):
        conv_over = tuning.problem_key(problem_of(inputs))
        run_op(inputs)
    assert tuner.timer.calls == 4
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = not matmul_tf32
    try:
        matmul_over = tuning.problem_key(problem_of(inputs))
        run_op(inputs)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    assert tuner.timer.calls == 6
    run_op(inputs)
    assert tuner.timer.calls == 6  # the default setting's decision again
    assert len({default, conv_over, matmul_over}) == 3, (default, conv_over, matmul_over)
    bf16 = [t.detach().bfloat16() for t in inputs]
    assert "conv:" not in tuning.problem_key(problem_of(bf16))


def _a_cached_decision(tuner, monkeypatch):
    """(inputs, cache file, its JSON) after the stand-in "fast" beat torch on one problem."""
    install_backends(monkeypatch, StandInBackend("fast"))
    tuner.timer = FakeTimer({"fast": 0.5, "torch": 1.0})
    inputs = make_inputs()
    run_op(inputs)
    path = cache_path(torch.device("cpu"))
    return inputs, path, json.loads(path.read_text())


def test_cache_round_trips_and_survives_corrupt_and_foreign_files(tuner, monkeypatch):
    inputs, path, stored = _a_cached_decision(tuner, monkeypatch)
    assert stored["device"] and stored["versions"]["anfast"] == anfast.__version__
    assert [d["backend"] for d in stored["decisions"].values()] == ["fast"]

    # A fresh process reads the decision back and measures nothing.
    reader = Tuner(timer=FakeTimer({}), lazy_devices=("cpu",))
    tuning.set_tuner(reader)
    run_op(inputs)
    assert reader.timer.calls == 0 and reader.lookup(problem_of(inputs)).backend == "fast"

    foreign = dict(stored, device="Some Other GPU", capability="sm_75")
    malformed = dict(stored, decisions={key: {**decision, "candidates": {"fast": {"verified": True}}}
                                        for key, decision in stored["decisions"].items()})
    for content, why in (("{not json", "unreadable"), (json.dumps(foreign), "written for"),
                         (json.dumps(malformed), r"the decision for \[.*\], candidate 'fast' has the keys")):
        path.write_text(content)
        fresh = Tuner(timer=FakeTimer({"fast": 0.5, "torch": 1.0}), lazy_devices=("cpu",))
        tuning.set_tuner(fresh)
        with pytest.warns(UserWarning, match=f"ignoring tuning cache .*{why}"):
            run_op(inputs)
        assert fresh.timer.calls == 2  # tuned again, and the file is valid once more
        assert json.loads(path.read_text())["device"] == stored["device"]


def _with_fast(decision, **fields):
    return {**decision, "candidates": {**decision["candidates"],
                                       "fast": {**decision["candidates"]["fast"], **fields}}}


@pytest.mark.parametrize("spoil, why", [
    (lambda d: {**d, "backend": "cudnn"}, r"'backend' is 'cudnn', not a backend of this anfast \(fast, torch\)"),
    (lambda d: _with_fast(d, ms=None), r"candidate 'fast': 'verified' is true but 'ms' is None"),
    (lambda d: _with_fast(d, ms=float("nan")), r"candidate 'fast': 'verified' is true but 'ms' is nan"),
    (lambda d: _with_fast(d, verified=False, ms=None, why="raised"),
     r"'backend' is 'fast', which has no verified candidate"),
    (lambda d: {**d, "candidates": {**d["candidates"], "cudnn": d["candidates"]["fast"]}},
     r"candidate 'cudnn' is not a fused backend of this anfast \(fast\)"),
    (lambda d: {**d, "variant": "64x64"}, r"'variant' is '64x64', its candidate's is ''"),
], ids=["unknown-backend", "verified-ms-null", "verified-ms-nan", "chosen-unverified", "unknown-candidate",
        "other-variant"])
def test_cache_entry_auto_cannot_use_makes_the_file_count_as_corrupt(tuner, monkeypatch, spoil, why):
    """Well-typed entries that name what auto cannot run or explain (an unknown or unverified
    backend, a verified result without a time) are ignored with the file, as a malformed one
    is: a warning naming the file, then tuned again; never a crash or an unverified backend."""
    inputs, path, stored = _a_cached_decision(tuner, monkeypatch)
    path.write_text(json.dumps(dict(stored, decisions={key: spoil(decision)
                                                       for key, decision in stored["decisions"].items()})))
    fresh = Tuner(timer=FakeTimer({"fast": 0.5, "torch": 1.0}), lazy_devices=("cpu",))
    tuning.set_tuner(fresh)
    with pytest.warns(UserWarning, match=f"ignoring tuning cache {re.escape(str(path))}: invalid .*{why}"):
        assert "not tuned yet" in explain(problem_of(inputs))
    run_op(inputs)
    assert fresh.timer.calls == 2 and fresh.lookup(problem_of(inputs)).backend == "fast"


def test_no_tuning_during_cuda_graph_capture_or_with_anfast_tune_0(tuner, monkeypatch):
    fast = StandInBackend("fast")
    install_backends(monkeypatch, fast)
    tuner.timer = FakeTimer({"fast": 0.5, "torch": 1.0})
    inputs = make_inputs()
    monkeypatch.setattr(tuning, "stream_is_capturing", lambda device: True)
    run_op(inputs)
    assert tuner.timer.calls == 0 and fast.forward_calls == 0
    assert "cannot tune now: a CUDA graph is being captured" in explain(problem_of(inputs))
    monkeypatch.setenv("ANFAST_TUNE", "0")
    monkeypatch.setattr(tuning, "stream_is_capturing", lambda device: False)
    run_op(inputs)
    assert tuner.timer.calls == 0 and fast.forward_calls == 0
    monkeypatch.delenv("ANFAST_TUNE")
    run_op(inputs)  # tunes now
    calls = fast.forward_calls
    monkeypatch.setattr(tuning, "stream_is_capturing", lambda device: True)
    run_op(inputs)  # a decided key runs its decision inside a capture too
    assert fast.forward_calls == calls + 1 and tuner.timer.calls == 2


def test_two_gloo_ranks_take_rank_0s_decisions(tmp_path):
    # Rank 0's timer makes "fast" win, rank 1's makes it lose: tuning alone, they diverge.
    processes = [subprocess.Popen([sys.executable, str(WORKER), str(rank), "2",
                                   str(tmp_path / "store"), str(tmp_path / f"rank{rank}.json"),
                                   str(tmp_path / f"cache{rank}")])
                 for rank in range(2)]
    for process in processes:
        assert process.wait(timeout=240) == 0
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["decisions"] for r in ranks] == [["fast", "fast"]] * 2
    assert [(r["before"], r["after"]) for r in ranks] == [("torch", "fast")] * 2
    assert [r["timings"] for r in ranks] == [4, 0]  # rank 0 measured both problems alone


@pytest.mark.slow
def test_default_cpu_training_never_touches_the_fused_backends(monkeypatch, tmp_path):
    """With no GPU (the extension built or not), auto never even asks cuda or triton."""
    from anfast.ops.cuda_backend import CudaBackend
    from anfast.train.loop import fit
    from anfast.triton.backend import TritonBackend
    from test_train_config import make_image_folder, tiny_config

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"auto on the CPU touched the {self.name} backend")

    for backend in (CudaBackend, TritonBackend):
        for method in ("unsupported_reasons", "forward", "backward"):
            monkeypatch.setattr(backend, method, refuse)
    monkeypatch.delenv("ANFAST_BACKEND", raising=False)
    data = make_image_folder(tmp_path / "data")
    summary = fit(tiny_config(data, tmp_path / "run", epochs=1))
    assert summary["backends"] and set(summary["backends"].values()) == {"torch"}


@pytest.mark.slow
def test_anfast_tune_on_the_interpreter_verifies_triton_chooses_torch_then_reads_the_cache(
        tmp_path, monkeypatch, capsys):
    """The issue's CPU command, on the first block of resnet18 (the interpreter needs
    minutes for the whole model): the real verification and timing path end to end."""
    from anfast.cli import main

    monkeypatch.setenv("ANFAST_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["tune", "--device", "cpu", "--arch", "resnet18", "--alpha", "4", "--batch-size", "2",
            "--image-size", "32", "--backends", "triton,torch", "--layers", "layer1.0.*"]
    reports = []
    for run in range(2):
        monkeypatch.setattr(tuning, "_tuner", Tuner())  # a new process: only the file carries decisions
        assert main(argv + ["--out", str(tmp_path / f"t{run}.json")]) == 0
        reports.append((capsys.readouterr().out, json.loads((tmp_path / f"t{run}.json").read_text())))
    (first_text, first), (second_text, second) = reports
    assert first["complete"] and [layer["layer"] for layer in first["layers"]] == ["layer1.0.conv1",
                                                                                 "layer1.0.conv2"]
    for layer in first["layers"]:
        triton = layer["candidates"]["triton"]
        assert triton["verified"] and triton["error"] < 2e-2 and triton["ms"] > 0
        assert layer["choice"] == "torch" and not layer["cached"]
        assert f"{layer['layer']} " in first_text
    assert "triton verified" in first_text and "1 timed, 0 cached" in first_text
    assert "0 timed, 1 cached" in second_text and "cached " in second_text
    assert all(layer["cached"] for layer in second["layers"])
    # Cached, not re-timed: the very same measurements come back.
    assert [(l["torch_ms"], l["candidates"]) for l in second["layers"]] == \
        [(l["torch_ms"], l["candidates"]) for l in first["layers"]]


def test_train_backend_option_is_checked_and_reaches_every_layer():
    from anfast.train.config import ConfigError, TrainConfig
    from anfast.nn.backends import set_backend

    with pytest.raises(ConfigError, match=r"backend='cudnn'; choose one of \['auto', 'torch', 'triton', 'cuda'\]"):
        TrainConfig(backend="cudnn").validate()
    an = anfast.adjoin("resnet18", alpha=4, policy="paper", input_size=(3, 32, 32), num_classes=10)
    convs = [m for m in an.modules() if isinstance(m, anfast.nn.AdjoinedConv2d)]
    set_backend(an, "triton")
    assert convs and all(m.backend == "triton" for m in convs)
    set_backend(an, "auto")  # leaves $ANFAST_BACKEND its say
    assert all(m.backend is None for m in convs)


@pytest.mark.parametrize("fast_ms, pinned", [(1.5, "torch"), (0.5, None)])
def test_prepare_backends_pins_convs_auto_decided_for_torch(tuner, monkeypatch, fast_ms, pinned):
    """Decide, then trace: a conv tuned to torch is fixed to torch, so it runs (and
    compiles) as aten convolutions; a conv tuned to a fused backend stays with auto."""
    from anfast.ops import conv as conv_op
    from anfast.nn.backends import prepare_backends

    install_backends(monkeypatch, StandInBackend("fast"))
    tuner.timer = FakeTimer({"fast": fast_ms, "torch": 1.0})
    an = anfast.adjoin("resnet18", alpha=4, policy="paper", input_size=(3, 16, 16), num_classes=4)
    convs = [m for m in an.modules() if isinstance(m, anfast.nn.AdjoinedConv2d) and not m.input_shared]
    prepare_backends(an, "auto", 2, 16, None)
    assert convs and {m.backend for m in convs} == {pinned}
    op_calls = []
    original = conv_op._adjoined_conv2d_op
    monkeypatch.setattr(conv_op, "_adjoined_conv2d_op", lambda *args: op_calls.append(1) or original(*args))
    an(torch.randn(2, 3, 16, 16))
    assert len(op_calls) == (0 if pinned else len(convs))


@pytest.mark.parametrize("fast_ms", [0.5, 1.5])
def test_prepare_backends_decides_the_evaluations_keys_of_the_layers_auto_keeps(tuner, monkeypatch,
                                                                                 fast_ms):
    """An evaluation (no_grad) meets keys without gradients: prepare_backends decides
    them for the convs left with auto, so evaluating measures nothing; for convs pinned
    to torch it decides none (they run aten convolutions, whatever their key)."""
    from anfast.nn.backends import collect_layer_problems, prepare_backends

    install_backends(monkeypatch, StandInBackend("fast"))
    tuner.timer = FakeTimer({"fast": fast_ms, "torch": 1.0})
    an = anfast.adjoin("resnet18", alpha=4, policy="paper", input_size=(3, 16, 16), num_classes=4)
    prepare_backends(an, "auto", 2, 16, None)
    keys = {tuning.problem_key(problem) for _, problem, _ in
            collect_layer_problems(an, 2, 16, None, gradients=False)}
    decided = tuner.table(torch.device("cpu"))
    assert keys and all(" grad0000 " in key for key in keys)  # no_grad: no gradients, whatever requires_grad says
    if fast_ms < 1:  # the fused backend won: every conv stays with auto
        assert keys <= decided.keys() and {decided[key].backend for key in keys} == {"fast"}
    else:
        assert not keys & decided.keys()
    before = tuner.timer.calls
    an.eval()
    with torch.no_grad():
        an(torch.randn(2, 3, 16, 16))
    assert tuner.timer.calls == before


def test_prepare_backends_with_anfast_tune_0_reads_the_cache_and_measures_nothing(tuner, monkeypatch):
    """ANFAST_TUNE=0 (gpu_check's train_bench after its tune step): the warm-up measures
    nothing; a conv without a cached decision is pinned to torch, which auto would run,
    and one whose cached decision is a fused backend stays with auto."""
    from anfast.nn.backends import prepare_backends

    install_backends(monkeypatch, StandInBackend("fast"))
    tuner.timer = FakeTimer({"fast": 0.5, "torch": 1.0})
    an = anfast.adjoin("resnet18", alpha=4, policy="paper", input_size=(3, 16, 16), num_classes=4)
    convs = [m for m in an.modules() if isinstance(m, anfast.nn.AdjoinedConv2d) and not m.input_shared]
    monkeypatch.setenv("ANFAST_TUNE", "0")
    prepare_backends(an, "auto", 2, 16, None)
    assert tuner.timer.calls == 0 and {m.backend for m in convs} == {"torch"}
    monkeypatch.delenv("ANFAST_TUNE")
    prepare_backends(an, "auto", 2, 16, None)
    tuned = tuner.timer.calls
    assert tuned > 0 and {m.backend for m in convs} == {None}
    monkeypatch.setenv("ANFAST_TUNE", "0")
    prepare_backends(an, "auto", 2, 16, None)
    assert tuner.timer.calls == tuned and {m.backend for m in convs} == {None}


def test_anfast_tune_cut_short_keeps_the_layers_it_decided_in_its_out_json(tmp_path, monkeypatch):
    """--out is rewritten as each layer is decided, so a tune a time limit ends (a GPU
    lease) leaves the layers done, marked incomplete; a whole tune is marked complete."""
    from anfast.cli import main

    monkeypatch.setenv("ANFAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tuning, "_tuner", Tuner(timer=FakeTimer({"torch": 1.0}), lazy_devices=("cpu",)))
    argv = ["tune", "--device", "cpu", "--arch", "resnet18", "--batch-size", "2", "--image-size", "32",
            "--backends", "torch", "--layers", "layer2.0.*", "--out", str(tmp_path / "tune.json")]
    decide, calls = Tuner.decide, []

    def cut_at_the_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a time limit's SIGINT / SIGTERM handler raises
        return decide(self, *args, **kwargs)

    monkeypatch.setattr(Tuner, "decide", cut_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    cut = json.loads((tmp_path / "tune.json").read_text())
    assert not cut["complete"] and [layer["layer"] for layer in cut["layers"]] == ["layer2.0.conv1"]
    assert cut["layers"][0]["choice"] == "torch" and cut["totals"]["layers"] == 1

    monkeypatch.setattr(Tuner, "decide", decide)
    assert main(argv) == 0
    whole = json.loads((tmp_path / "tune.json").read_text())
    assert whole["complete"] and [layer["layer"] for layer in whole["layers"]] == [
        "layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"]
    assert [layer["cached"] for layer in whole["layers"]] == [True, False, False]  # the cut tune's first


def test_a_bare_anfast_tune_tunes_the_model_a_bare_anfast_train_trains(tmp_path, monkeypatch):
    """The model flags default to TrainConfig's in both commands: a default tune fills the
    cache a default train reads (same network, batch, image size, AMP dtype, layout)."""
    import anfast.cli
    import anfast.cli.tune
    import anfast.train.loop
    from test_train_config import make_image_folder

    class Seen(Exception):
        pass

    def describe(model, batch_size, image_size, amp_dtype):
        weight = next(p for p in model.parameters() if p.dim() == 4)
        return {"tensors": {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()},
                "widths": {name: widths for name, widths in model.layer_widths.items()},
                "batch": batch_size, "image": image_size, "amp": amp_dtype, "device": weight.device,
                "channels_last": weight.is_contiguous(memory_format=torch.channels_last)
                and not weight.is_contiguous()}

    seen = {}

    def tuned(model, batch_size, image_size, amp_dtype, *args, **kwargs):
        seen["tune"] = describe(model, batch_size, image_size, amp_dtype)
        raise Seen

    def prepared(model, backend, batch_size, image_size, amp_dtype):
        seen["train"] = describe(model, batch_size, image_size, amp_dtype)
        raise Seen

    monkeypatch.setattr(anfast.cli.tune, "tune_model", tuned)
    monkeypatch.setattr(anfast.train.loop, "prepare_backends", prepared)
    with pytest.raises(Seen):
        anfast.cli.main(["tune"])
    # As many classes as the built-in set (tune's --num-classes default), enough for a batch of 64.
    data = make_image_folder(tmp_path / "data", classes=tuple("abcdefghij"))
    with pytest.raises(Seen):
        anfast.cli.main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--workers", "0"])
    assert seen["tune"] == seen["train"]
    assert seen["tune"]["batch"] == 64 and seen["tune"]["image"] == 32  # TrainConfig's, not resnet50's
    assert any(name.startswith("layer4") for name in seen["tune"]["widths"])  # a resnet18, adjoined


def test_the_backward_pass_runs_the_backend_its_forward_ran(tuner, monkeypatch):
    """The choice is made once, before the op: a decision that changes between the forward
    and the backward pass (here the tuner is replaced) does not reach that call's backward."""
    class Counting(StandInBackend):
        backward_calls = 0

        def backward(self, *args, **kwargs):
            self.backward_calls += 1
            return super().backward(*args, **kwargs)

    fast = Counting("fast")
    install_backends(monkeypatch, fast)
    tuner.timer = FakeTimer({"fast": 0.5, "torch": 1.0})
    inputs = make_inputs()
    y_base, y_student = adjoined_conv2d(*inputs, out_student=4, padding=1)  # decides "fast"
    assert tuner.lookup(problem_of(inputs)).backend == "fast"
    ran = fast.backward_calls  # verifying and timing ran it too
    tuning.set_tuner(Tuner(timer=FakeTimer({}), lazy_devices=("cpu",)))  # would say torch now
    (y_base.square().sum() + 3 * y_student.sum()).backward()
    assert fast.backward_calls == ran + 1
    # ... and its gradients are the float64 reference's.
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    y64 = adjoined_conv2d_reference(*leaves, 4, (1, 1), (1, 1), (1, 1), 1, None)
    (y64[0].square().sum() + 3 * y64[1].sum()).backward()
    for name, t, reference in zip(("dx_base", "dx_student", "dweight", "dbias"), inputs, leaves):
        assert_close_rel(t.grad, reference.grad, 1e-5, name)


def test_a_compiled_call_reads_the_decision_its_eager_call_tuned(tuner, monkeypatch):
    """torch.compile leaves the choice to the op's body, which sees its inputs without
    requires_grad: the gradients a call needs travel as an argument, so the forward pass
    looks up the key eager mode tuned, not one of an inference problem."""
    install_backends(monkeypatch, StandInBackend("fast"))
    tuner.timer = FakeTimer({"fast": 0.5, "torch": 1.0})
    inputs = make_inputs()
    eager = run_op(inputs)
    cpu = torch.device("cpu")
    assert tuner.timer.calls == 2 and len(tuner.table(cpu)) == 1

    reader = Tuner(timer=FakeTimer({"fast": 0.5, "torch": 1.0}), lazy_devices=("cpu",))
    tuning.set_tuner(reader)
    seen = []
    lookup = reader.lookup
    monkeypatch.setattr(reader, "lookup", lambda problem: seen.append(tuning.problem_key(problem)) or lookup(problem))
    # The images come from ops inside the graph, as a network's activations do.
    conv = torch.compile(lambda x_base, x_student, weight, bias: adjoined_conv2d(
        x_base * 1, x_student * 1, weight, bias, out_student=4, padding=1), backend="aot_eager", fullgraph=True)
    for t in inputs:
        t.grad = None
    y_base, y_student = conv(*inputs)
    (y_base.square().sum() + 3 * y_student.sum()).backward()
    assert seen and set(seen) == set(tuner.table(cpu)), seen  # forward and backward: eager's key
    assert reader.timer.calls == 0
    for got, want in zip((y_base, y_student, *(t.grad for t in inputs)), eager):
        assert_close_rel(got.detach(), want, 1e-6)


def test_the_gpu_timer_queues_its_repeats_and_waits_for_them_once(monkeypatch):
    """On a GPU a candidate's repeats are queued back to back between their events and
    waited for once, so the host runs ahead as in training: a synchronize after each
    repeat left the GPU idle while the host queued the next and added that host time to
    every candidate. The result is the median of the events' elapsed times."""
    log = []

    class Event:  # stands in for torch.cuda.Event: a "time" is the position in the log
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            log.append("record")
            self.at = len(log)

        def elapsed_time(self, end):
            return float(end.at - self.at)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *device: log.append("synchronize"))
    ms = tuning.default_timer(lambda: log.append("run"), backend="cuda", device=torch.device("cuda"))
    assert log == ["run"] * 5 + ["synchronize"] + ["record", "run", "record"] * 20 + ["synchronize"]
    assert ms == 2.0
