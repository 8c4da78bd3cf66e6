"""Top-1, top-5 and cross-entropy of the base and every student, over ranks."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from anfast.train.distributed import all_reduce_sum

__all__ = ["evaluate", "format_table"]


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, *,
             amp_dtype: Optional[torch.dtype] = None, show_progress: bool = False,
             alphas: Sequence[float] = ()) -> Dict[str, Any]:
    """Evaluate an adjoined model (its forward returns AdjoinedOutput) on ``loader``.

    Returns {"base": {"top1", "top5", "loss"}, "students": [{..., "alpha"}], "samples"};
    sums are all-reduced, so every rank returns the same numbers.
    """
    was_training = model.training
    model.eval()
    sums = None  # per network: loss sum, top-1 hits, top-5 hits
    samples = 0
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
    model.train(was_training)
    if sums is None:
        raise ValueError("the validation loader yielded no batches; the val/ split is empty")
    totals = all_reduce_sum([*sums.flatten().tolist(), samples], device)
    samples = int(totals[-1])
    rows = [{"top1": totals[3 * i + 1] / samples, "top5": totals[3 * i + 2] / samples,
             "loss": totals[3 * i] / samples} for i in range(sums.shape[0])]
    for row, alpha in zip(rows[1:], alphas):
        row["alpha"] = float(alpha)
    return {"base": rows[0], "students": rows[1:], "samples": samples}


def format_table(metrics: Dict[str, Any]) -> str:
    """A fixed-width table of top-1 / top-5 / loss per network."""
    lines = [f"{'network':<22}{'top-1 %':>9}{'top-5 %':>9}{'loss':>9}"]
    named = [("base", metrics["base"])]
    named += [(f"student {i} (alpha {row.get('alpha', float('nan')):g})", row)
              for i, row in enumerate(metrics["students"])]
    for name, row in named:
        lines.append(f"{name:<22}{100 * row['top1']:>9.2f}{100 * row['top5']:>9.2f}"
                     f"{row['loss']:>9.4f}")
    return "\n".join(lines)
