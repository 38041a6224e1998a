"""Routing: which parameters are Muon matrices (`rules`), how fused weights split (`splits`),
how tensor parallelism split them (`tp_layout`) and which are weight-decayed (`weight_decay`).

The modules' names are re-exported, so that `from muon_megatron.routing import
is_muon_param` (the path before the package was layered) keeps working.
"""

from muon_megatron.routing import rules, splits, tp_layout, weight_decay
from muon_megatron.routing.rules import *  # noqa: F403  (re-export)
from muon_megatron.routing.splits import *  # noqa: F403  (re-export)
from muon_megatron.routing.tp_layout import *  # noqa: F403  (re-export)
from muon_megatron.routing.weight_decay import *  # noqa: F403  (re-export)

__all__ = [*rules.__all__, *splits.__all__, *tp_layout.__all__, *weight_decay.__all__]
