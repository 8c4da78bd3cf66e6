"""Top-1, top-5 and cross-entropy of the base and every student, over ranks."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from anfast.export import export_base, export_student
from anfast.nn.modes import eval_mode
from anfast.profile import profile
from anfast.runs.distributed import all_reduce_sum
from anfast.runs.records import alpha_label

__all__ = ["evaluate", "format_table", "network_costs"]


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, *,
             amp_dtype: Optional[torch.dtype] = None, show_progress: bool = False,
             alphas: Sequence[float] = ()) -> Dict[str, Any]:
    """Evaluate an adjoined model (its forward returns AdjoinedOutput) on ``loader``.

    Returns {"base": {"top1", "top5", "loss"}, "students": [{..., "alpha"}], "samples"};
    sums are all-reduced, so every rank returns the same numbers.
    """
    sums = None  # per network: loss sum, top-1 hits, top-5 hits
    samples = 0
    with eval_mode(model):
        for images, labels in tqdm(loader, desc="eval", leave=False,
                                   disable=None if show_progress else True):
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                out = model(images)
            networks = (out.base, *out.students)
            if sums is None:
                sums = torch.zeros(len(networks), 3, dtype=torch.float64, device=device)
            labels = labels.to(device)
            k = min(5, networks[0].shape[1])
            for index, logits in enumerate(networks):
                logits = logits.float()
                hits = logits.topk(k, dim=1).indices.eq(labels[:, None])
                sums[index, 0] += F.cross_entropy(logits, labels, reduction="sum")
                sums[index, 1] += hits[:, 0].sum()
                sums[index, 2] += hits.any(dim=1).sum()
            samples += labels.numel()
    if sums is None:
        raise ValueError("the validation loader yielded no batches; the val/ split is empty")
    totals = all_reduce_sum([*sums.flatten().tolist(), samples], device)
    samples = int(totals[-1])
    rows = [{"top1": totals[3 * i + 1] / samples, "top5": totals[3 * i + 2] / samples,
             "loss": totals[3 * i] / samples} for i in range(sums.shape[0])]
    for row, alpha in zip(rows[1:], alphas):
        row["alpha"] = float(alpha)
    return {"base": rows[0], "students": rows[1:], "samples": samples}


def network_costs(an: torch.nn.Module, image_size: int) -> List[Dict[str, int]]:
    """anfast.profile of the exported base and every student at one image: [base, *students]."""
    networks = [export_base(an)] + [export_student(an, index=i) for i in range(an.num_students)]
    return [profile(network, (1, 3, image_size, image_size)) for network in networks]


def format_table(metrics: Dict[str, Any], costs: Optional[Sequence[Dict[str, int]]] = None) -> str:
    """A fixed-width table of top-1 / top-5 / loss per network, with ``costs`` (from
    network_costs) also parameters and GFLOPs: the accuracy / cost trade-off of a run."""
    lines = [f"{'network':<22}{'top-1 %':>9}{'top-5 %':>9}{'loss':>9}"
             + (f"{'params':>14}{'GFLOPs':>10}" if costs else "")]
    named = [("base", metrics["base"])]
    named += [(f"student {i} (alpha {alpha_label(row.get('alpha'))})", row)
              for i, row in enumerate(metrics["students"])]
    for index, (name, row) in enumerate(named):
        lines.append(f"{name:<22}{100 * row['top1']:>9.2f}{100 * row['top5']:>9.2f}"
                     f"{row['loss']:>9.4f}"
                     + (f"{costs[index]['params']:>14,}{costs[index]['flops'] / 1e9:>10.3f}" if costs else ""))
    return "\n".join(lines)

