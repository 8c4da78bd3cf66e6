"""Training: ``fit(TrainConfig)`` (loop), the step engine (step, graphs), building a run's parts
(build) and evaluating and exporting a finished run (evaluate, export). The commands that
call them live in anfast/cli/; what a run is on disk, in anfast/runs/.

``fit`` and ``TrainConfig`` load on first use so ``import anfast`` stays light.
"""

__all__ = ["fit", "TrainConfig"]


def __getattr__(name):
    if name == "fit":
        from anfast.train.loop import fit

        return fit
    if name == "TrainConfig":
        from anfast.train.config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'anfast.train' has no attribute {name!r}")
