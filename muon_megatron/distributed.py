"""Moved: `muon_megatron.optimizer.distributed`. This old path stays importable.

The module object is the moved one itself (not a copy of its names), so code that patches
`muon_megatron.distributed.X` patches what the optimizer uses.
"""

import sys

from muon_megatron.optimizer import distributed as _moved

sys.modules[__name__] = _moved
