"""One rank of test_tuning's 2-rank gloo run: python tuning_worker.py RANK WORLD STORE OUT CACHE.

Each rank has its own cache directory (as on separate nodes) and a timer that disagrees
with the other rank's about which backend is faster; the ranks must still agree.
"""

import json
import os
import sys

import pytest
import torch
import torch.distributed as dist

from anfast.ops import tuning
from anfast.ops.conv import _problem
from anfast.ops.dispatch import choose_backend
from helpers import FakeTimer, StandInBackend, install_backends


def main(rank: int, world: int, store: str, out: str, cache: str) -> None:
    os.environ["ANFAST_CACHE_DIR"] = cache
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    timer = FakeTimer({"fast": 0.5 if rank == 0 else 2.0, "torch": 1.0})
    tuning.set_tuner(tuning.Tuner(timer=timer, lazy_devices=("cpu",)))
    install_backends(pytest.MonkeyPatch(), StandInBackend("fast"))
    problems = []
    for channels, size in ((13, 7), (16, 5)):
        x_base = torch.randn(3, channels, size, size, requires_grad=True)
        weight = torch.randn(11, channels, 3, 3, requires_grad=True)
        problems.append(_problem(x_base, x_base[:, :5].detach().clone().requires_grad_(), weight,
                                 None, None, 4, [1, 1], [1, 1], [1, 1], 1))
    before = choose_backend(problems[0]).name  # no lazy tuning inside a distributed run
    decisions = tuning.tune_problems(problems)
    after = choose_backend(problems[0]).name
    with open(out, "w") as file:
        json.dump({"before": before, "after": after, "timings": timer.calls,
                   "decisions": [decision.backend for decision, _ in decisions]}, file)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
