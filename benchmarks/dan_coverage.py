"""Which timm and torchvision CNNs can a DAN search shrink, and does its masked network compute the students it derives?

    python benchmarks/dan_coverage.py                      # adjoin_coverage.py's 60 timm CNNs
    python benchmarks/dan_coverage.py --set hybrids        # its 60 hybrids, ViTs, MLPs, CNNs
    python benchmarks/dan_coverage.py --set torchvision    # its 22 torchvision CNNs
    python benchmarks/dan_coverage.py convnext_atto torchvision:convnext_tiny   # or name the models

For each architecture (random weights, those the library starts at zero drawn too: a
residual branch's last norm at zero would hide what the branch computes; 10 classes,
nothing downloaded): the search's
network, `anfast.adjoin(model, alpha=1, policy="all")` in float64 at 96 px (or the
model's own size where its attention takes no other), and its
`anfast.dan.SearchSpace`: how many of the width groups that can shrink the search
searches (the others are reduced over or mixed in a way no mask narrows, or a shift is
added to them: docs/dan.md, "Limits"), and through how many LayerNorms / GroupNorms /
GRNs, weight-standardised convs and ops a mask's zeros do not pass (CBAM's mean and max
over the channels, StarReLU's scalar bias).
Then, for ``--draws`` random architectures (one width choice
per group), the network masked by one-hot gates against the student the search would
derive (adjoin with those widths, exported as the model's own class), in eval mode on
one batch, and the cost model's FLOPs and parameters against anfast.profile of that
export; then one search step in train mode under soft gates (forward, cross-entropy on
base and student, backward: the model's in-place ops after masked layers included),
whose gates' gradient must be finite and not all zero. A row says "searches" only when
the outputs agree to 1e-9 (relative), the counts are equal and the step's gradient
reaches the gates; else "differs", "refused" (adjoin's or the search's reason) or
"failed". The JSON goes to results/dan_coverage-<cpu>-<date>.json (dan_coverage_hybrids-...
for the second set, dan_coverage_torchvision-... for the third).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adjoin_coverage import SETS, _relative_error, adjoin_at_its_size, create, survey  # noqa: E402
from common import environment  # noqa: E402

import anfast  # noqa: E402
from anfast.dan import CostModel, DanError, SearchSpace, StudentMasks  # noqa: E402


def check(name: str, image_size: int, draws: int) -> dict:
    """One model's row: status, reason or errors, groups searched of those that can shrink,
    the layers searched through, and each drawn architecture's parameters."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    row: dict = {"model": name, "image_size": image_size}
    try:
        model = create(name).eval()
        network, row["image_size"] = adjoin_at_its_size(model, image_size, alpha=1, policy="all")
        network.eval()
        space = SearchSpace.from_network(network)
    except (anfast.AdjoinError, DanError) as error:
        return {**row, "status": "refused", "reason": str(error)}
    except Exception as error:  # the library or fx: the row names it, the survey goes on
        return {**row, "status": "failed", "reason": f"{type(error).__name__}: {error}"}
    input_size = (3, row["image_size"], row["image_size"])
    row["groups"] = {"shrinkable": sum(not g.fixed for g in network.width_groups), "searched": len(space.groups)}
    row["through"] = {"norms": len(space.norm_points), "standardised_convs": len(space.standardised_points),
                      "reductions": len(space.reduction_points)}
    try:
        cost = CostModel(network, space, input_size)
        masks = StudentMasks(network, space)
        images = torch.randn(2, *input_size, dtype=torch.float64)
        row["draws"] = []
        for _ in range(draws):
            choice = torch.randint(0, len(space.choices), (len(space.groups),), generator=generator)
            alphas = space.alphas(choice)
            policy = {producer: alphas[g.name] for g in space.groups for producer in g.producers}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                derived = anfast.adjoin(model, alpha=1, policy=policy, round_to=space.round_to, input_size=input_size)
            student = anfast.export_student(derived).eval()
            masks.set_gates(torch.nn.functional.one_hot(choice, len(space.choices)).double())
            with torch.no_grad():
                error = _relative_error(network(images).student, student(images))
            counted, profiled = cost.exact(choice), anfast.profile(student, input_size)
            row["draws"].append({"student_error": error, "cost_equals_profile": counted == profiled,
                                 "params": profiled["params"], "flops": profiled["flops"]})
        row["step_gates_grad"] = search_step(network, masks, len(space.choices), images, generator)
        masks.remove()
    except Exception as error:
        return {**row, "status": "failed", "reason": f"{type(error).__name__}: {error}"}
    row["params"], row["flops"] = cost.base["params"], cost.base["flops"]
    exact = all(d["student_error"] <= 1e-9 and d["cost_equals_profile"] for d in row["draws"]) and (
        0 < row["step_gates_grad"] < float("inf"))
    row["status"] = "searches" if exact else "differs"
    return row


def search_step(network, masks: StudentMasks, choices: int, images: torch.Tensor,
                generator: torch.Generator) -> float:
    """One search step's forward and backward in train mode under soft gates (random
    logits, softmax), cross-entropy on base and student against random labels: the norm of
    the gates' gradient (nan or inf where it is not finite). Leaves the network in eval mode."""
    logits = torch.randn(len(masks.space.groups), choices, dtype=torch.float64, generator=generator)
    logits.requires_grad_()
    masks.set_gates(torch.softmax(logits, -1))
    network.train()
    try:
        output = network(images)
        labels = torch.randint(0, output.base.shape[-1], (images.shape[0],), generator=generator)
        loss = sum(torch.nn.functional.cross_entropy(logits_of, labels) for logits_of in (output.base, output.student))
        loss.backward()
    finally:
        network.eval()
    return float(logits.grad.norm())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="timm model names or torchvision:NAME (default: the --set)")
    parser.add_argument("--set", choices=SETS, default="cnns", help="which list to try (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=96,
                        help="of the tracing and checking input (a model whose attention takes only its own: that)")
    parser.add_argument("--draws", type=int, default=2, help="random architectures checked per model")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/dan_coverage-<cpu>-<date>.json)")
    args = parser.parse_args(argv)
    if args.draws < 1:
        parser.error(f"--draws {args.draws}: give 1 or more")
    try:
        import timm
    except ImportError:
        parser.error("timm is not installed: pip install timm (or the [test] extra)")

    models = args.models or SETS[args.set]
    benchmark = "dan_coverage" if args.models or args.set == "cnns" else f"dan_coverage_{args.set}"
    payload = {**environment("cpu"), "timm": timm.__version__, "image_size": args.image_size, "draws": args.draws,
               "set": None if args.models else args.set, "rows": []}
    def describe(row: dict) -> str:
        if row["status"] in ("refused", "failed"):
            return row["reason"].splitlines()[0][:120]
        groups, through = row["groups"], row["through"]
        return (f"{groups['searched']} of {groups['shrinkable']} groups, through {through['norms']} norms, "
                f"{through['standardised_convs']} standardised convs and {through['reductions']} reductions "
                f"or shifts; largest student error "
                f"{max(d['student_error'] for d in row['draws']):.1e}")

    path = survey(models, lambda name: check(name, args.image_size, args.draws), describe,
                  ("searches", "differs", "refused", "failed"), benchmark, payload, args.out, desc="dan")
    counts = payload["counts"]
    print(f"{counts['searches']} of {len(payload['rows'])} search exactly ({counts}); wrote {path}")
    return payload


if __name__ == "__main__":
    main()
