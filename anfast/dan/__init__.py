"""DAN: differentiable search of one student width per width group (DESIGN.md section 3).

    result = anfast.dan.search(SearchConfig(target_flops=0.4, train=search_training(arch="resnet18")))
    result.arch_path            # RUN_DIR/arch.json, for `anfast train --arch-config`

``derive`` measures the student of given per-group alphas; ``CostModel`` is the
differentiable FLOPs / params model the search penalises.
"""

from anfast.dan.cost import CostModel
from anfast.dan.derive import ARCH_FORMAT, derive, plot_widths, read_arch, write_arch
from anfast.dan.gates import ChoiceGates, StudentMasks, temperature
from anfast.dan.search import SearchConfig, SearchResult, search, search_training
from anfast.dan.space import DEFAULT_CHOICES, DanError, SearchSpace

__all__ = [
    "ARCH_FORMAT",
    "ChoiceGates",
    "CostModel",
    "DEFAULT_CHOICES",
    "DanError",
    "SearchConfig",
    "SearchResult",
    "SearchSpace",
    "StudentMasks",
    "derive",
    "plot_widths",
    "read_arch",
    "search",
    "search_training",
    "temperature",
    "write_arch",
]
