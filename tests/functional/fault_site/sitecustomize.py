"""Test harness only: on this folder's PYTHONPATH, installs `fault_rank`'s kill point in the
torchrun worker whose RANK is MUON_TEST_FAULT_RANK (default 1), at interpreter start, before
`-m muon_megatron.megatron_lm` runs `pretrain_gpt.py`. Other processes are left alone. A
point that cannot be installed (a megatron-core without the function it wraps) stops the
rank at once, with the traceback: `site` would otherwise print a line and run on unarmed."""

import os
import sys

if os.environ.get("MUON_TEST_FAULT") and os.environ.get("RANK") == os.environ.get(
    "MUON_TEST_FAULT_RANK", "1"
):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        import fault_rank

        fault_rank.install_from_env()
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(70)
