"""Moved: `muon_megatron.megatron_lm.arguments`. This old path stays importable.

The module object is the moved one itself, so `muon_megatron.arguments.X` is
`muon_megatron.megatron_lm.arguments.X`.
"""

import sys

from muon_megatron.megatron_lm import arguments as _moved

sys.modules[__name__] = _moved
