"""Training: ``fit(TrainConfig)``, the loss, and the `train` / `eval` / `export` commands.

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
