"""anfast.train.evaluate.evaluate against hand-counted accuracies and a float64 loss.

Everything a run reports as top-1 / top-5 / loss (summary.json, eval.json, the table, the
paper table) comes from this function, so it is checked here against an independent
reference and not only against itself.
"""

import math

import pytest
import torch

from anfast.adjoin import AdjoinedOutput
from anfast.train.evaluate import evaluate

CLASSES = 8
# Each sample's label is the class of this rank in its logits (0: the largest logit): the
# base's top-1 hits are the rank-0 labels (2 of 8) and its top-5 hits those of rank < 5
# (5 of 8); the student's 3 of 8 and 7 of 8. Neither top-5 is 1.0 or equal to top-1.
BASE_RANKS = [0, 2, 6, 0, 4, 7, 1, 5]
STUDENT_RANKS = [0, 0, 3, 7, 1, 4, 0, 2]
BATCHES = (5, 3)  # two batches of unequal size: a mean of batch means would differ


def _logits_and_labels(generator):
    logits = {name: torch.empty(len(ranks), CLASSES, dtype=torch.float64)
              for name, ranks in (("base", BASE_RANKS), ("student", STUDENT_RANKS))}
    labels = torch.empty(len(BASE_RANKS), dtype=torch.long)
    for row in range(len(BASE_RANKS)):
        order = torch.randperm(CLASSES, generator=generator)  # order[r]: the class ranked r
        values = torch.linspace(3.0, -2.0, CLASSES, dtype=torch.float64)  # distinct: no ties
        labels[row] = order[BASE_RANKS[row]]
        logits["base"][row, order] = values
        # The student ranks the same label at STUDENT_RANKS[row]: swap it into that place.
        student_order = order.clone()
        at = (student_order == labels[row]).nonzero().item()
        student_order[[at, STUDENT_RANKS[row]]] = student_order[[STUDENT_RANKS[row], at]]
        logits["student"][row, student_order] = values * 0.7
    return logits, labels


class _FixedOutputs(torch.nn.Module):
    """Returns the prepared logits of the batch whose index its images hold."""

    def __init__(self, per_batch):
        super().__init__()
        self.per_batch = per_batch
        self.seen_training = []

    def forward(self, images):
        self.seen_training.append(self.training)
        base, student = self.per_batch[int(images[0, 0])]
        return AdjoinedOutput(base.float(), (student.float(),))


def test_evaluate_matches_hand_counted_accuracy_and_a_float64_loss():
    logits, labels = _logits_and_labels(torch.Generator().manual_seed(0))
    loader, per_batch, start = [], [], 0
    for index, size in enumerate(BATCHES):
        rows = slice(start, start + size)
        per_batch.append((logits["base"][rows], logits["student"][rows]))
        loader.append((torch.full((size, 1), float(index)), labels[rows]))
        start += size
    model = _FixedOutputs(per_batch).train()
    metrics = evaluate(model, loader, torch.device("cpu"), alphas=(4.0,))

    def reference(name, ranks):
        loss = -torch.log_softmax(logits[name], dim=1).gather(1, labels[:, None]).mean().item()
        return {"top1": sum(r == 0 for r in ranks) / len(ranks), "top5": sum(r < 5 for r in ranks) / len(ranks),
                "loss": loss}

    expected = {"base": reference("base", BASE_RANKS), "student": reference("student", STUDENT_RANKS)}
    assert (expected["base"]["top1"], expected["base"]["top5"]) == (2 / 8, 5 / 8)  # the hand count above
    assert (expected["student"]["top1"], expected["student"]["top5"]) == (3 / 8, 7 / 8)
    (student,) = metrics["students"]
    for got, want in ((metrics["base"], expected["base"]), (student, expected["student"])):
        assert got["top1"] == want["top1"] and got["top5"] == want["top5"], (got, want)
        assert math.isclose(got["loss"], want["loss"], rel_tol=1e-6), (got, want)
    assert student["alpha"] == 4.0 and metrics["samples"] == len(labels)
    assert model.seen_training == [False, False] and model.training  # evaluated in eval mode, then restored


def test_evaluate_refuses_a_loader_that_yields_nothing():
    with pytest.raises(ValueError, match="the validation loader yielded no batches"):
        evaluate(_FixedOutputs([]), [], torch.device("cpu"))
