"""The CPU-checkable parts of the GPU benchmarks: conv.py's per-phase calls compute the
gradients their names claim (vs torch autograd in float64), ncu_layer.py reads an Nsight
Compute listing and tune results as documented (vs hand-written files), step_census.py
counts launches as a fused graph and an adjoined step must; gpu_check.sh, rehearsed
through dry_python.py, runs every step's command line as its program accepts it."""

import contextlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import torch.nn.functional as F
import torchvision

import helpers
from helpers import small_resnet

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import conv  # noqa: E402
import step_census  # noqa: E402
import ncu_layer  # noqa: E402


def test_conv_phases_compute_what_they_are_named_after_in_float64():
    """forward, dgrad, wgrad and backward of the cudnn-x2 provider (what every fused
    provider is timed against) vs autograd through F.conv2d on the sliced weight."""
    torch.manual_seed(0)
    shape = conv.ConvShape(c_in=16, c_out=24, kernel=3, stride=2, padding=1, height=9, width=9,
                           in_student=8, out_student=8)
    problem, grad_base, grad_student = conv.make_problem(shape, 2, torch.float64, device="cpu")
    found = conv.providers(problem, compiled=False)
    calls = conv.phase_calls(*found["cudnn-x2"], grad_base, grad_student)
    assert list(calls) == ["forward", "dgrad", "wgrad", "backward", "total"]

    x_b = problem.x_base.detach().clone().requires_grad_()
    x_s = problem.x_student.detach().clone().requires_grad_()
    w = problem.weight.detach().clone().requires_grad_()
    y_b = F.conv2d(x_b, w, stride=2, padding=1)
    y_s = F.conv2d(x_s, w[:8, :8], stride=2, padding=1)
    dx_b, dx_s, dw = torch.autograd.grad((y_b, y_s), (x_b, x_s, w), (grad_base, grad_student))

    out_b, out_s = calls["forward"]()
    torch.testing.assert_close(out_b, y_b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_s, y_s, rtol=1e-12, atol=1e-12)
    got_dx_b, got_dx_s, no_dw, _ = calls["dgrad"]()
    assert no_dw is None
    torch.testing.assert_close(got_dx_b, dx_b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_dx_s, dx_s, rtol=1e-12, atol=1e-12)
    no_dx_b, no_dx_s, got_dw, _ = calls["wgrad"]()
    assert no_dx_b is None and no_dx_s is None
    torch.testing.assert_close(got_dw, dw, rtol=1e-12, atol=1e-12)
    all_dx_b, all_dx_s, all_dw, _ = calls["backward"]()
    for got, want in ((all_dx_b, dx_b), (all_dx_s, dx_s), (all_dw, dw)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_conv_layer_patterns_select_shapes_and_name_the_fix():
    shapes = conv.resnet50_conv_shapes(4.0)
    chosen = conv.select_shapes(shapes, ["layer3.0.conv2", "layer1.*.conv2"])
    names = sorted(n for group, _ in chosen for n in group)
    # layer1's three 3x3 convs share one shape; layer3.0.conv2 is the strided 3x3.
    assert names == ["layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2", "layer3.0.conv2"]
    assert {s.stride for _, s in chosen} == {1, 2}
    with pytest.raises(SystemExit, match="no ResNet-50 conv matches.*layer1.0.conv2"):
        conv.select_shapes(shapes, ["layer9.*"])


def test_conv_benchmark_times_each_layer_on_the_problem_training_tunes():
    """conv.py (and ncu_layer.py) time each ResNet-50 layer on the problem a channels_last
    bf16 training step hands the op, under the tuning key `anfast tune` records for it
    (collected here through the op's own path), so a fused backend runs the kernel variant
    the tune chose for that layer. The stem is no such problem: training computes its
    student with the base (input_shared)."""
    import anfast
    from anfast.nn.backends import collect_layer_problems
    from anfast.ops.tuning import problem_key

    network = anfast.adjoin("resnet50", alpha=4, policy="paper", input_size=(3, 224, 224))
    network = network.to(memory_format=torch.channels_last)
    recorded = {name: problem_key(problem)
                for name, problem, _ in collect_layer_problems(network, 2, 224, torch.bfloat16)}
    assert len(recorded) == 52 and "conv1" not in recorded
    benchmarked = set()
    for names, shape in conv.resnet50_conv_shapes(4.0):
        problem, _, _ = conv.make_problem(shape, 2, torch.bfloat16, device="cpu")
        for name in names:
            if name != "conv1":
                assert problem_key(problem) == recorded[name], name
                benchmarked.add(name)
    assert benchmarked == set(recorded)


def _tune_file(path, layers):
    path.write_text(json.dumps({"tune": {"layers": layers}}))
    return path


def test_ncu_pick_names_each_backends_slowest_verified_layer(tmp_path):
    fresh = _tune_file(tmp_path / "fresh.json", [
        {"layer": "a", "torch_ms": 1.0, "candidates": {"cuda": {"ms": 2.0, "verified": True}}},
        {"layer": "b", "torch_ms": 2.0, "candidates": {"cuda": {"ms": 5.0, "verified": True},
                                                        "triton": {"ms": 90.0, "verified": False}}},
    ])
    older = _tune_file(tmp_path / "older.json", [
        {"layer": "c", "torch_ms": 1.0, "candidates": {"cuda": {"ms": 9.0, "verified": True},
                                                        "triton": {"ms": 3.0, "verified": True}}},
    ])
    # cuda: b (2.5x) in the first file wins over the older file's c; triton is unverified
    # in the first file, so the older file's measurement decides.
    assert ncu_layer.slowest_layers([fresh, older]) == {"cuda": ("b", 2.5), "triton": ("c", 3.0)}


# What `ncu --import REP --csv --page details` prints (abridged: two sections), with
# ncu's own lines around it: three marker kernels split forward / dgrad / wgrad; IDs
# order numerically (12 after 5).
NCU_LISTING = '''==PROF== Connected to process 4242
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","4242","python3","h","spin_kernel(long)","1","7","(1, 1, 1)","(1, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","usecond","1.02"
"1","4242","python3","h","void fprop_kernel<cutlass::Foo<128, 3>>(Params)","1","7","(128, 1, 1)","(1,024, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","msecond","1.25"
"1","4242","python3","h","void fprop_kernel<cutlass::Foo<128, 3>>(Params)","1","7","(128, 1, 1)","(1,024, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Compute (SM) Throughput","%","41.5"
"1","4242","python3","h","void fprop_kernel<cutlass::Foo<128, 3>>(Params)","1","7","(128, 1, 1)","(1,024, 1, 1)","0","9.0","Launch Statistics","Registers Per Thread","register/thread","168"
"2","4242","python3","h","spin_kernel(long)","1","7","(1, 1, 1)","(1, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","usecond","1.01"
"3","4242","python3","h","dgrad_kernel","1","7","(256, 1, 1)","(2,048, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","usecond","1,500.5"
"4","4242","python3","h","zero_fill","1","7","(256, 1, 1)","(64, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","nsecond","2,000"
"5","4242","python3","h","spin_kernel(long)","1","7","(1, 1, 1)","(1, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","usecond","1.00"
"12","4242","python3","h","wgrad_kernel","1","7","(256, 1, 1)","(96, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","usecond","800"
"12","4242","python3","h","wgrad_kernel","1","7","(256, 1, 1)","(96, 1, 1)","0","9.0","Launch Statistics","Registers Per Thread","register/thread","n/a"
==PROF== Disconnected from process 4242
'''


def test_ncu_listing_is_split_into_phases_with_durations_in_microseconds(tmp_path):
    path = tmp_path / "ncu-fused-cuda-layer1.0.conv2.csv"
    path.write_text(NCU_LISTING)
    (report,) = ncu_layer.summarize([path])
    assert (report["provider"], report["layer"]) == ("fused-cuda", "layer1.0.conv2")
    kernels = report["kernels"]
    assert [(k["id"], k["phase"]) for k in kernels] == [(1, "forward"), (3, "dgrad"), (4, "dgrad"), (12, "wgrad")]
    assert kernels[0]["grid"] == "(1,024, 1, 1)"
    assert ncu_layer.metric(kernels[0], "Duration") == pytest.approx(1250.0)
    assert ncu_layer.metric(kernels[0], "Compute (SM) Throughput") == pytest.approx(41.5)
    assert ncu_layer.metric(kernels[0], "Registers Per Thread") == 168
    assert ncu_layer.metric(kernels[3], "Registers Per Thread") is None  # "n/a" is not a number
    assert kernels[3]["metrics"]["Launch Statistics / Registers Per Thread"]["value"] == "n/a"
    assert report["phase_us"] == pytest.approx({"forward": 1250.0, "dgrad": 1502.5, "wgrad": 800.0})
    assert ncu_layer.short_name(kernels[0]["name"]) == "void fprop_kernel"


def test_plot_results_reads_verified_ratios_in_network_order(tmp_path):
    import plot_results

    tune = _tune_file(tmp_path / "tune.json", [
        {"layer": "layer1.10.conv1", "torch_ms": 2.0, "candidates": {"cuda": {"ms": 3.0, "verified": True}}},
        {"layer": "layer1.2.conv1", "torch_ms": 1.0, "candidates": {"cuda": {"ms": 4.0, "verified": True},
                                                                     "triton": {"ms": 9.0, "verified": False}}},
        {"layer": "conv1", "torch_ms": 1.0, "candidates": {"triton": {"ms": 2.0, "verified": True}}},
    ])
    assert plot_results.layer_ratios([tune]) == {"cuda": {"layer1.10.conv1": 1.5, "layer1.2.conv1": 4.0},
                                                 "triton": {"conv1": 2.0}}
    # Block indices sort as numbers (2 before 10), not as text.
    names = ["layer1.10.conv1", "layer2.0.conv1", "layer1.2.conv1", "layer1.2.conv2"]
    assert sorted(names, key=plot_results.network_order) == [
        "layer1.2.conv1", "layer1.2.conv2", "layer1.10.conv1", "layer2.0.conv1"]
    throughput = tmp_path / "throughput.json"
    throughput.write_text(json.dumps({"providers": {"base": {"images_per_second": 100.0},
                                                    "anfast": {"images_per_second": 60.0}}}))
    out = plot_results.plot([tune], throughput, tmp_path / "figure.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="no verified fused candidate"):
        plot_results.plot([_tune_file(tmp_path / "none.json", [])], throughput, tmp_path / "no.png")
    assert plot_results.cudnn_version("91900") == "9.19"
    assert plot_results.cudnn_version("8902") == "8.9"  # cuDNN 8 numbered major * 1000


def test_step_census_builds_timm_models_by_name_and_names_the_file_after_them(tmp_path, monkeypatch):
    """--arch timm:NAME builds the timm model with --num-classes classes; the JSON's name
    has no colon."""
    import timm
    from common import base_model

    base = base_model("timm:resnet18", num_classes=7)
    assert isinstance(base, timm.models.ResNet) and base.num_classes == 7
    assert base_model("resnet18", num_classes=7) == "resnet18"
    written = []
    monkeypatch.setattr(step_census, "write_result",
                        lambda name, result, out: written.append((name, result)) or tmp_path / f"{name}.json")
    monkeypatch.setattr(sys, "argv", ["step_census.py", "--arch", "timm:resnet18", "--providers", "base",
                                      "--batch-size", "2", "--image-size", "32", "--num-classes", "7"])
    step_census.main()
    name, result = written[-1]
    assert name == "step_census-timm-resnet18-paper" and result["arch"] == "timm:resnet18"
    assert result["providers"]["base"]["flops"]["total"] > 0


@pytest.mark.slow
def test_launch_census_counts_fewer_launches_compiled_and_more_for_the_adjoined_step():
    """step_census.py --launches on the CPU: inductor fuses the elementwise work (fewer
    launches compiled), and the AN step launches more than the plain one (its students).
    On a one-stage ResNet, every layer shrunk: ResNet-18's compiles took 147 s of the suite,
    this network's 40 s."""
    from train_throughput import build_providers

    providers = build_providers(small_resnet(10, stages=1), 4.0, 10, (3, 16, 16), policy="all")
    counts = {}
    for name in ("base", "anfast_torch"):
        model, loss_fn = providers[name]
        counts[name] = {mode: step_census.launch_census(
            model, loss_fn, compiled=mode == "compiled", batch_size=2, image_size=16, num_classes=10,
            channels_last=False, device=torch.device("cpu")) for mode in ("eager", "compiled")}
    for name, count in counts.items():
        assert 0 < count["compiled"] < count["eager"], (name, count)
    assert counts["anfast_torch"]["eager"] > counts["base"]["eager"], counts
    assert counts["anfast_torch"]["compiled"] > counts["base"]["compiled"], counts


def test_a_cuda_launch_census_counts_the_devices_events_only():
    """On CUDA a launch is a device event (kernel, memcpy, memset): the host's aten op and
    inductor's launcher record (named after its Triton kernel) are the same launches seen
    from the CPU, and a user annotation's device span launches nothing. On the CPU the
    outermost computing aten op and inductor's kernels count."""
    from types import SimpleNamespace

    host, device = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(name, device_type, parent=None, annotation=False):
        return SimpleNamespace(name=name, device_type=device_type, cpu_parent=parent,
                               is_user_annotation=annotation)

    add = event("aten::add_", host)
    events = [add, event("aten::add", host, parent=add),
              event("void at::native::vectorized_elementwise_kernel<4>", device),
              event("triton_poi_fused_add_relu_0", host), event("triton_poi_fused_add_relu_0", device),
              event("Memcpy HtoD (Pageable -> Device)", device), event("ProfilerStep#1", device, annotation=True)]
    assert [step_census._is_launch(e, on_cuda=True) for e in events] == [False, False, True, False, True, True, False]
    assert [step_census._is_launch(e, on_cuda=False) for e in events[:2] + events[3:4]] == [True, False, True]


# ----------------------------------------------------------------- gpu_check.sh, rehearsed

REPO = pathlib.Path(__file__).resolve().parents[1]
DRY_PYTHON = [sys.executable, str(REPO / "benchmarks" / "dry_python.py")]


def _gpu_check_steps() -> list:
    """gpu_check.sh's ALL_STEPS, in its order."""
    script = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    return re.search(r'^ALL_STEPS="([^"]+)"', script, re.M).group(1).split()


def test_dry_python_refuses_an_unknown_flag_and_a_selection_of_no_test():
    """The rehearsal can fail: a flag the script's parser does not know exits 2, a pytest
    selection that collects nothing exits 5, a command line the parser takes exits 0."""

    commands = {  # command line -> the exit status it must give; all four run side by side
        ("benchmarks/conv.py", "--quick", "--no-such-flag"): 2,
        ("benchmarks/conv.py", "--quick", "--no-compiled"): 0,
        ("-m", "anfast", "tune", "--no-such-flag"): 2,
        ("-m", "pytest", "-q", "tests/test_import_graph.py", "-k", "no_such_test"): 5,
    }
    running = {argv: subprocess.Popen([*DRY_PYTHON, *argv], cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for argv in commands}
    try:
        for argv, process in running.items():
            stdout, stderr = process.communicate(timeout=300)
            assert process.returncode == commands[argv], (argv, stdout[-2000:], stderr[-2000:])
            if "--no-such-flag" in argv and argv[0].endswith("conv.py"):
                assert "unrecognized arguments: --no-such-flag" in stderr
    finally:  # a failed check leaves no process running
        for process in running.values():
            process.kill()
            process.wait()


def test_the_dry_python_server_ends_each_command_as_python_would(tmp_path):
    """Through the fork server: an exit with a message prints it and gives 1, os._exit(3)
    gives 3, a signal N gives 128 + N; a command whose client is killed (by gpu_check's
    `timeout`) ends with it; a command that would import another checkout's anfast is
    refused (the fork has this one's)."""
    with _dry_python_server() as socket_path:
        env = {**os.environ, "DRY_PYTHON_SERVER": socket_path}

        def dry(*argv, cwd=REPO):
            return subprocess.run([*DRY_PYTHON, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)

        ended = dry("-c", "import sys; sys.exit('no such layer')")
        assert (ended.returncode, ended.stderr) == (1, "no such layer\n")
        assert dry("-c", "import os; os._exit(3)").returncode == 3
        assert dry("-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)").returncode == 128 + 15
        (tmp_path / "other" / "anfast").mkdir(parents=True)
        (tmp_path / "other" / "anfast" / "__init__.py").touch()
        refused = dry("-m", "anfast", "tune", cwd=tmp_path / "other")
        assert refused.returncode == 2 and "start a server there" in refused.stderr, refused.stderr

        pid_file = tmp_path / "pid"
        client = subprocess.Popen([*DRY_PYTHON, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write("
                                   f"str(os.getpid())); time.sleep(120)"], cwd=REPO, env=env)
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and client.poll() is None
            time.sleep(0.05)
        client.kill()
        client.wait()
        pid = int(pid_file.read_text())
        while _alive(pid):  # ended by the server's child itself, reaped by the server
            assert time.monotonic() < deadline, f"the command {pid} outlived its killed client"
            time.sleep(0.05)


@contextlib.contextmanager
def _dry_python_server():
    """A running ``dry_python.py --serve``; yields its socket's path (in a short folder:
    a Unix socket's path is at most 107 bytes) and kills it on the way out."""
    with tempfile.TemporaryDirectory(prefix="dry") as folder:
        path = os.path.join(folder, "socket")
        server = subprocess.Popen([*DRY_PYTHON, "--serve", path], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        try:
            assert server.stdout.readline().startswith("dry_python: serving on"), server.communicate()[0]
            yield path
        finally:
            server.kill()
            server.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_gpu_check_rehearsed_on_the_cpu_runs_every_step_but_the_install(tmp_path):
    """gpu_check.sh with dry_python.py for python: every step's command line is accepted by
    its program and every pytest step collects tests, so a lease is not spent on a renamed
    flag or test. The install (pip's build of the extension) and ncu are the GPU machine's."""
    steps = [step for step in _gpu_check_steps() if step != "install"]
    # Every other step in each of two runs side by side, every command a fork of one
    # dry_python server that imported torch once (a Python start-up per command: 63 s).
    halves = {name: steps[start::2] for name, start in (("even", 0), ("odd", 1))}
    runs = {}
    with _dry_python_server() as socket_path:
        for name, half in halves.items():
            env = {**os.environ, "PYTHON": " ".join(DRY_PYTHON), "NCU": str(tmp_path / "no-ncu"),
                   "TRITON_CACHE_DIR": str(tmp_path / f"triton-{name}"), "DRY_PYTHON_SERVER": socket_path}
            with open(tmp_path / f"{name}.log", "w") as log:
                runs[name] = subprocess.Popen(["bash", "benchmarks/gpu_check.sh", str(tmp_path / name), *half],
                                              cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        for run in runs.values():
            run.wait(timeout=280)
    for name, half in halves.items():
        output = (tmp_path / f"{name}.log").read_text()
        rows = [line.split("\t") for line in (tmp_path / name / "summary.tsv").read_text().splitlines()]
        status = {row[0]: row[1] for row in rows}
        expected = {step: "SKIPPED" if step == "ncu" else "ok" for step in half}
        for step, report in (("cuda_correct", "correctness_report"),
                             ("triton_correct", "correctness_report_triton")):
            if step in half:  # each correctness step's JSON is written as it ends
                expected[report] = "ok"
        assert status == expected, output[-3000:]
        assert runs[name].returncode == int("ncu" in half), output[-3000:]  # a skipped ncu is not done


def test_benchmarks_readme_lists_gpu_checks_steps_in_their_order():
    """benchmarks/README.md's step list is gpu_check.sh's: one backticked step name opens
    each numbered item, in ALL_STEPS's order."""
    readme = (REPO / "benchmarks" / "README.md").read_text()
    section = readme.split("## gpu_check.sh", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\d+\. `(\w+)`", section, re.M)
    assert listed == _gpu_check_steps(), listed


def test_train_throughput_killed_mid_run_keeps_the_rounds_it_finished(tmp_path):
    """A time limit (a GPU lease's) that kills train_throughput.py mid-run leaves a whole
    JSON of the rounds done: it is rewritten, atomically, after every round."""
    command = [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--device", "cpu",
               "--arch", "resnet18", "--image-size", "16", "--batch-size", "2", "--warmup", "1",
               "--rounds", "10000", "--steps", "1", "--providers", "base,anfast_torch",
               "--out", str(tmp_path)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # A round's line is printed before its JSON is written: at round 3's, round 2's is.
        for line in process.stdout:
            if line.startswith("round 3/"):
                break
        else:
            pytest.fail(f"train_throughput.py ended before round 3 (exit {process.wait()})")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    result = json.loads((tmp_path / "train_throughput.json").read_text())
    assert result["rounds"] == 10000 and result["rounds_done"] >= 2
    assert set(result["providers"]) == {"base", "anfast_torch"} == set(result["warmup_s"])
    for row in result["providers"].values():
        assert row["rounds"] == result["rounds_done"] and row["images_per_second"] > 0
    speed = {name: row["images_per_second"] for name, row in result["providers"].items()}
    assert result["ratios"]["anfast_torch_over_base"] == pytest.approx(speed["anfast_torch"] / speed["base"])


def test_train_throughput_leaves_out_a_key_whose_set_up_fails_and_measures_the_rest(tmp_path, monkeypatch):
    """A key whose build or warm-up raises (on a GPU: a capture error, an out-of-memory of
    the CUDA graphs' pools) is named under "errors", and every other key is still warmed
    up and timed in every round, in the order eager, compiled, graphs."""
    import train_throughput

    built = []

    def build_step(model, loss_fn, mode, *args, **kwargs):
        built.append((loss_fn is F.cross_entropy, mode))
        if mode != "off":  # what a compiled step computes is not the question here
            return lambda: None
        if loss_fn is not F.cross_entropy:  # the adjoined provider's eager step: an OOM's stand-in
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (stand-in)")
        return real_build_step(model, loss_fn, mode, *args, **kwargs)

    real_build_step = train_throughput.build_step
    monkeypatch.setattr(train_throughput, "build_step", build_step)
    monkeypatch.setattr(sys, "argv", [
        "train_throughput.py", "--device", "cpu", "--arch", "resnet18", "--image-size", "16",
        "--batch-size", "2", "--warmup", "1", "--rounds", "2", "--steps", "1",
        "--providers", "anfast_torch,base", "--compile", "default,off", "--out", str(tmp_path)])
    train_throughput.main()
    result = json.loads((tmp_path / "train_throughput.json").read_text())
    assert built == [(False, "off"), (True, "off"), (False, "default"), (True, "default")]
    assert list(result["errors"]) == ["anfast_torch"]
    assert result["errors"]["anfast_torch"].startswith("RuntimeError: CUDA out of memory")
    assert set(result["providers"]) == {"base", "base+default", "anfast_torch+default"} == set(result["warmup_s"])
    assert result["providers"]["base"]["rounds"] == 2 == result["rounds_done"]
    # No ratio needs the missing eager row; those of the rows that ran are there.
    assert "anfast_torch_over_base" not in result["ratios"]
    assert "anfast_torch+default_over_anfast_torch" not in result["ratios"]
    assert result["ratios"]["anfast_torch_over_base+default"] == pytest.approx(
        result["providers"]["anfast_torch+default"]["images_per_second"]
        / result["providers"]["base+default"]["images_per_second"])



def test_train_throughputs_search_step_trains_the_weights_by_sgd_and_the_logits_by_their_own_adam():
    """The dan provider's step is a search's: the gated full-width network (every shrinkable
    group searched), its loss CE + KL + gamma * R, the weights stepped by the run's SGD and
    the architecture logits by Adam alone. Checked on one step from the gradients it left:
    SGD's first step moves a weight by -lr * grad; Adam's moves a logit by -lr * g / (|g| +
    eps), about lr against the gradient's sign, and no SGD step on top."""
    import train_throughput
    from anfast.dan import SearchConfig
    from anfast.dan.search import GatedNetwork

    torch.manual_seed(0)
    providers = train_throughput.build_providers(small_resnet(10, stages=2), 4.0, 10, (3, 16, 16), policy="all")
    model, loss_fn = providers["dan"]
    assert isinstance(model, GatedNetwork)
    space = model.masks.space
    assert len(space.groups) == len(model.network.width_groups) - 2  # all but the image's and the logits'
    images, labels = torch.randn(2, 3, 16, 16), torch.tensor([1, 7])
    step = train_throughput.build_step(
        model, loss_fn, "off", None, images, labels, scaler=torch.amp.GradScaler("cpu", enabled=False),
        batch_size=2, image_size=16, num_classes=10, channels_last=False, amp_dtype=None,
        memory_format=torch.contiguous_format)
    weights = {name: p.detach().clone() for name, p in model.network.named_parameters()}
    theta = model.gates.theta.detach().clone()
    step()
    for name, parameter in model.network.named_parameters():
        torch.testing.assert_close(parameter.detach(), weights[name] - 1e-3 * parameter.grad, msg=name)
    gradient = model.gates.theta.grad
    assert gradient is not None and (gradient.abs() > 1e-6).all(), "every group's logits take the penalty's gradient"
    torch.testing.assert_close(model.gates.theta.detach(),
                               theta - SearchConfig.arch_lr * gradient / (gradient.abs() + 1e-8))

def test_a_test_that_breaks_the_cuda_context_stops_its_process(monkeypatch):
    """After a GPU test whose kernel faulted (the next synchronize raises, as it does for a
    sticky CUDA error), the process stops: an xdist worker exits (xdist replaces it), a
    plain run ends its session. A working or unused context changes nothing."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: calls.append("is_initialized") or True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("synchronize"))
    helpers.stop_if_cuda_context_is_broken("tests/x.py::fine")
    assert calls == ["is_initialized", "synchronize"]

    def fault():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", fault)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    with pytest.raises(pytest.exit.Exception, match=r"tests/x.py::faulted left this process's CUDA "
                                                    r"context unusable \(CUDA error: an illegal memory"):
        helpers.stop_if_cuda_context_is_broken("tests/x.py::faulted")

    def process_exit(code):  # os._exit does not return
        raise SystemExit(f"os._exit({code})")

    monkeypatch.setattr(os, "_exit", process_exit)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    with pytest.raises(SystemExit, match=r"os._exit\(1\)"):
        helpers.stop_if_cuda_context_is_broken("tests/x.py::faulted")

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # a test that never used CUDA
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: pytest.fail("synchronized an unused context"))
    helpers.stop_if_cuda_context_is_broken("tests/x.py::cpu_only")


def test_step_census_ratios_use_the_launch_counts_done_so_far():
    """The census writes its JSON after each launch count (every provider's eager step, then
    the compiled ones): a run cut after the eager counts reports their ratios, and none for
    a mode one side lacks."""
    meta = {"flops": {"total": 10.0}, "calls": {"gemm": 2, "other": 4}, "elements": {"other": 8}}
    rows = {"base": {**meta, "launches": {"eager": 100, "compiled": 40}},
            "anfast_torch": {"flops": {"total": 12.0}, "calls": {"gemm": 4, "other": 10},
                             "elements": {"other": 12}, "launches": {"eager": 215}}}
    assert step_census.ratios_to_base(rows) == {"anfast_torch": {
        "flops": 1.2, "gemm_calls": 2.0, "other_calls": 2.5, "other_elements": 1.5, "launches_eager": 2.15}}


def _refusing_mobilenets(function, error: Exception, model_of=lambda model: model):
    """``function`` raising ``error`` where its first argument is (``model_of`` it) a timm
    MobileNetV3: every model the surveys list is taken, so the tests refuse one."""
    def refuse(first, *args, **kwargs):
        if type(model_of(first)).__name__ == "MobileNetV3":
            raise error
        return function(first, *args, **kwargs)

    return refuse


def test_adjoin_coverage_says_adjoins_only_where_base_and_export_agree(tmp_path, monkeypatch):
    """adjoin_coverage.py on resnet18 (adjoins), torchvision's (adjoins), mobilenetv3_small_050
    (refused, by the test: every model the survey lists adjoins) and a name timm does not
    know (failed); then with an export whose weights are off by a little: "differs"."""
    pytest.importorskip("timm")
    import adjoin_coverage
    import timm

    monkeypatch.setattr(adjoin_coverage.anfast, "adjoin", _refusing_mobilenets(
        adjoin_coverage.anfast.adjoin, adjoin_coverage.anfast.AdjoinError("blocks.0: refused by the test")))
    out = tmp_path / "coverage.json"
    payload = adjoin_coverage.main(["resnet18", "torchvision:resnet18", "mobilenetv3_small_050", "no_such_net",
                                    "--image-size", "32", "--out", str(out)])
    monkeypatch.undo()
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    rows = {row["model"]: row for row in payload["rows"]}
    assert rows["resnet18"]["status"] == "adjoins"
    base = sum(p.numel() for p in timm.create_model("resnet18", num_classes=10).parameters())
    assert rows["resnet18"]["params"]["base"] == base > rows["resnet18"]["params"]["student"]
    # Kept at full width: the image's 3 channels and the 10 logits; the rest shrink.
    assert rows["resnet18"]["groups"]["full_width"] == 2 and rows["resnet18"]["image_size"] == 32
    torchvision_row = rows["torchvision:resnet18"]
    base = sum(p.numel() for p in torchvision.models.resnet18(num_classes=10).parameters())
    assert torchvision_row["status"] == "adjoins" and torchvision_row["params"]["base"] == base
    assert torchvision_row["groups"]["full_width"] == 2
    assert rows["mobilenetv3_small_050"] == {"model": "mobilenetv3_small_050", "image_size": 32, "status": "refused",
                                             "reason": "blocks.0: refused by the test"}
    assert rows["no_such_net"]["status"] == "failed" and "no_such_net" in rows["no_such_net"]["reason"]
    assert payload["counts"] == {"adjoins": 2, "differs": 0, "refused": 1, "failed": 1}

    # --set picks a list, and its own default file: a run of the second set keeps the first's.
    tried = []
    monkeypatch.setattr(adjoin_coverage, "check", lambda name, alpha, size: tried.append(name) or {
        "model": name, "status": "refused", "reason": "by the test"})
    written = []
    monkeypatch.setattr(adjoin_coverage, "write_result", lambda name, payload, out: written.append(name) or out)
    payload = adjoin_coverage.main(["--set", "hybrids", "--out", str(tmp_path / "hybrids.json")])
    assert tried == adjoin_coverage.HYBRIDS and payload["set"] == "hybrids" and set(written) == {"adjoin_coverage_hybrids"}
    assert payload["counts"] == {"adjoins": 0, "differs": 0, "refused": len(adjoin_coverage.HYBRIDS), "failed": 0}
    monkeypatch.undo()

    export = adjoin_coverage.anfast.export_student
    def off_by_a_little(an, *args, **kwargs):
        student = export(an, *args, **kwargs)
        with torch.no_grad():
            student.fc.bias.add_(1e-6)
        return student
    monkeypatch.setattr(adjoin_coverage.anfast, "export_student", off_by_a_little)
    # Through main, whose progress line for a row without a reason once failed on it.
    (row,) = adjoin_coverage.main(["resnet18", "--image-size", "32", "--out", str(out)])["rows"]
    assert row["status"] == "differs" and 0 < row["student_error"] < 1e-3 and row["base_error"] <= 1e-12


def test_dan_coverage_says_searches_only_where_the_masked_network_is_the_derived_student(tmp_path, monkeypatch):
    """dan_coverage.py on resnet18 (searched: every group but the image's and the logits'),
    a model the search refuses (by the test) and a name timm does not know (failed); then
    with exports whose weights are off by a little: "differs"."""
    pytest.importorskip("timm")
    import dan_coverage

    monkeypatch.setattr(dan_coverage.SearchSpace, "from_network", _refusing_mobilenets(
        dan_coverage.SearchSpace.from_network, dan_coverage.DanError("refused by the test"),
        model_of=lambda network: network.architecture()))
    out = tmp_path / "dan.json"
    payload = dan_coverage.main(["resnet18", "mobilenetv3_small_050", "no_such_net", "--image-size", "32",
                                 "--out", str(out)])
    monkeypatch.undo()
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    rows = {row["model"]: row for row in payload["rows"]}
    resnet = rows["resnet18"]
    assert resnet["status"] == "searches" and resnet["groups"]["searched"] == resnet["groups"]["shrinkable"] > 0
    assert resnet["through"] == {"norms": 0, "standardised_convs": 0, "reductions": 0} and len(resnet["draws"]) == 2
    assert all(d["cost_equals_profile"] and d["student_error"] <= 1e-12 and d["params"] < resnet["params"]
               for d in resnet["draws"])
    refused = rows["mobilenetv3_small_050"]
    assert refused["status"] == "refused" and "by the test" in refused["reason"]
    assert rows["no_such_net"]["status"] == "failed" and "no_such_net" in rows["no_such_net"]["reason"]
    assert payload["counts"] == {"searches": 1, "differs": 0, "refused": 1, "failed": 1}

    export = dan_coverage.anfast.export_student
    def off_by_a_little(an, *args, **kwargs):
        student = export(an, *args, **kwargs)
        with torch.no_grad():
            student.fc.bias.add_(1e-6)
        return student
    monkeypatch.setattr(dan_coverage.anfast, "export_student", off_by_a_little)
    (row,) = dan_coverage.main(["resnet18", "--image-size", "32", "--draws", "1", "--out", str(out)])["rows"]
    assert row["status"] == "differs" and 0 < row["draws"][0]["student_error"] < 1e-3
