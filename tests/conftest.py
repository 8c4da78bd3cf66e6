"""Test session set-up: Triton runs on its interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here,
at collection time, before any test module imports anfast.triton.
"""

import os
import tempfile

# Inductor's CPU kernels compile as scalar C++ (here and in the tests' subprocesses): the
# tests ask what inductor receives and computes, not how gcc vectorises it (training
# compiles for the GPU), and from a cold cache the suite's compiles then take a quarter
# less (census, compile and host-read tests: 126 -> 97 s on the 2-core VM).
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Before inductor's config, which imports triton (torch >= 2.14): triton.language's
    # own jit functions (tl.cdiv) are made interpreted or compiled as triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch._inductor.config  # noqa: E402

if os.environ["TORCHINDUCTOR_VEC_ISA_OK"] == "0":  # read when the config was first imported
    torch._inductor.config.cpp.vec_isa_ok = False

# Auto's tuning decisions of a test run go to a scratch cache, never ~/.cache/anfast.
# The folder is removed when the session's process exits (TemporaryDirectory's
# finalizer); the test subprocesses inherit the variable and run inside the session.
if "ANFAST_CACHE_DIR" not in os.environ:
    _tuning_cache = tempfile.TemporaryDirectory(prefix="anfast-test-cache-")
    os.environ["ANFAST_CACHE_DIR"] = _tuning_cache.name

# So do the built-in dataset and the image-check caches (ANFAST_DATA_HOME): a test then
# sees what it would see on a fresh machine, whatever this one's ~/.cache/anfast holds
# (the set is drawn once per session, in seconds, by the first test that needs it).
if "ANFAST_DATA_HOME" not in os.environ:
    _data_home = tempfile.TemporaryDirectory(prefix="anfast-test-data-")
    os.environ["ANFAST_DATA_HOME"] = _data_home.name


@pytest.fixture(scope="session", autouse=True)
def background_work(request, tmp_path_factory):
    """{test module name: what its ``start_in_background(folder)`` returned}, for the test
    modules with a selected test named in their ``BACKGROUND_TESTS``: work of a minute or
    more (test_cuda_build's CMake build) that starts with the session, at low priority,
    and runs beside the tests before it, most of which keep one of two cores busy.
    Nothing starts under xdist (each worker would start its own); a test then starts its
    work itself. Whatever still runs at the session's end is killed."""
    started = {}
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        for item in request.session.items:
            module = getattr(item, "module", None)
            if (module is not None and module.__name__ not in started
                    and item.name in getattr(module, "BACKGROUND_TESTS", ())):
                started[module.__name__] = module.start_in_background(tmp_path_factory.mktemp(module.__name__))
    yield started
    for work in started.values():
        if work is not None and work[0].poll() is None:
            work[0].kill()
            work[0].wait()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """A test that broke the CUDA context stops its process (helpers.stop_if_cuda_context_is_broken;
    imported here, after TRITON_INTERPRET is set: helpers imports anfast)."""
    from helpers import stop_if_cuda_context_is_broken

    stop_if_cuda_context_is_broken(item.nodeid, item.config)
