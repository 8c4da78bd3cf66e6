"""Run records: metrics.jsonl, TensorBoard scalars, curves.png and tradeoff.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from anfast.runs.checkpoint import write_text_atomically

__all__ = ["MetricsLog", "alpha_label", "plot_curves", "plot_tradeoff"]


class MetricsLog:
    """One JSON line per epoch plus the same numbers as TensorBoard scalars (rank 0 only).

    On resume the file is rewritten from the history stored in the checkpoint, so an
    epoch logged after the last checkpoint and before a crash is not counted twice.
    """

    def __init__(self, run_dir: Path, history: List[Dict[str, Any]]):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        self.history = list(history)
        write_text_atomically(self.path, "".join(json.dumps(row) + "\n" for row in self.history))
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                    purge_step=self.history[-1]["step"] + 1 if self.history else None)

    def log(self, row: Dict[str, Any]) -> None:
        self.history.append(row)
        with self.path.open("a") as file:
            file.write(json.dumps(row) + "\n")
            file.flush()
        for name, value in _flatten(row).items():
            self.writer.add_scalar(name, value, global_step=row["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _flatten(row: Dict[str, Any], prefix: str = "") -> Dict[str, float]:
    scalars = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            scalars.update(_flatten(value, name + "/"))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, dict):
                    scalars.update(_flatten(item, f"{name}{index}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            scalars[name] = float(value)
    return scalars


def alpha_label(alpha: Optional[float]) -> str:
    """A student's alpha in a table or legend. Under --arch-config each width group has its
    own alpha (the rows carry none): no single number applies."""
    return "per group" if alpha is None else f"{alpha:g}"


def plot_curves(history: List[Dict[str, Any]], path: Path) -> None:
    """Base vs student top-1 and loss per epoch, and the distillation weight lambda."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] + 1 for row in history]
    figure, (accuracy_axis, loss_axis, lambda_axis) = plt.subplots(1, 3, figsize=(15, 4.2))
    series = [("base", lambda row: row["base"])]
    series += [(f"student {index} (alpha {alpha_label(student.get('alpha'))})",
                lambda row, index=index: row["students"][index])
               for index, student in enumerate(history[0]["students"])]
    for label, pick in series:
        accuracy_axis.plot(epochs, [100 * pick(row)["top1"] for row in history], marker="o",
                           label=f"{label} top-1")
        loss_axis.plot(epochs, [pick(row)["loss"] for row in history], marker="o",
                       label=f"{label} val")
    loss_axis.plot(epochs, [row["train_loss"] for row in history], linestyle="--", color="gray",
                   label="train (AN objective)")
    lambda_axis.plot(epochs, [row["lambda"] for row in history], marker="o", color="purple")
    accuracy_axis.set(title="validation top-1", xlabel="epoch", ylabel="%")
    loss_axis.set(title="loss", xlabel="epoch", ylabel="cross-entropy")
    lambda_axis.set(title="distillation weight lambda", xlabel="epoch", ylim=(0, 1.05))
    for axis in (accuracy_axis, loss_axis, lambda_axis):
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    accuracy_axis.legend()
    loss_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_tradeoff(summary: Dict[str, Any], costs: Sequence[Dict[str, int]], path: Path,
                  title: str = "") -> None:
    """Top-1 against GFLOPs and against parameters for the base and every student.

    ``summary`` has "base" and "students" rows (top1, alpha) as in summary.json;
    ``costs`` is [base, *students] from anfast.train.evaluate.network_costs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [summary["base"], *summary["students"]]
    labels = ["base"] + [f"alpha {s['alpha']:g}" if s.get("alpha") is not None else f"student {i}"
                         for i, s in enumerate(summary["students"])]
    top1 = [100 * row["top1"] for row in rows]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, values, xlabel in ((axes[0], [c["flops"] / 1e9 for c in costs], "GFLOPs (multiply-add = 2)"),
                                 (axes[1], [c["params"] / 1e6 for c in costs], "parameters (M)")):
        order = sorted(range(len(rows)), key=lambda i: values[i])
        axis.plot([values[i] for i in order], [top1[i] for i in order], color="gray", alpha=0.5, zorder=1)
        for index, label in enumerate(labels):
            axis.scatter(values[index], top1[index], s=50, zorder=2,
                         color="black" if index == 0 else f"C{index - 1}")
            axis.annotate(label, (values[index], top1[index]), textcoords="offset points", xytext=(6, 6))
        axis.set(xlabel=xlabel, ylabel="validation top-1 %")
        axis.grid(alpha=0.3)
        axis.margins(x=0.15, y=0.15)
    axes[0].set_title("accuracy vs compute")
    axes[1].set_title("accuracy vs size")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
