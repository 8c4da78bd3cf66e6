"""Input data: the built-in shapes dataset, torchvision and DALI loaders, data checks.

DALI is imported only when a DALI loader is built, so this package imports and
trains without it.
"""

from anfast.data.builtin import builtin_dataset, default_data_home
from anfast.data.folder import DataLayoutError, scan_split
from anfast.data.loader import choose_loader, create_loader, has_dali

__all__ = [
    "DataLayoutError",
    "builtin_dataset",
    "choose_loader",
    "create_loader",
    "default_data_home",
    "has_dali",
    "scan_split",
]
