"""Routing: which parameters are Muon matrices (`rules`) and how fused weights split (`splits`).

The names below are re-exported so that `from muon_megatron.routing import is_muon_param`
(the path before the package was layered) keeps working.
"""

from muon_megatron.routing.rules import ADAMW_NAME_PARTS, canonical_name, is_muon_param, param_kind
from muon_megatron.routing.splits import (
    MatrixSplit,
    ModelShape,
    combine_tp_pieces,
    extract_pieces,
    insert_pieces,
    matrix_split,
    split_tp_matrix,
)

__all__ = [
    "ADAMW_NAME_PARTS",
    "canonical_name",
    "is_muon_param",
    "param_kind",
    "MatrixSplit",
    "ModelShape",
    "matrix_split",
    "extract_pieces",
    "insert_pieces",
    "combine_tp_pieces",
    "split_tp_matrix",
]
