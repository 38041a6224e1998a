"""A stand-in for NVIDIA Transformer Engine, for muon-megatron's tests on CPU only.

Transformer Engine (TE) needs CUDA to build, so it cannot be installed on the CPU machines
the tests run on; megatron-core builds TE's layers by default on GPUs. This package is
importable as `transformer_engine` when its parent folder (`tests/te_stand_in`) is on
`sys.path`, which only the tests that run megatron-core's TE layer specs arrange, each in a
process of its own (`tests/te_stand_in/run.py`). Nothing in `muon_megatron/` imports it.

What it stands in for: TE 2.11 (tag v2.11 of github.com/NVIDIA/TransformerEngine), the
newest release megatron-core 0.16.1 accepts (its `dev` extra pins
`transformer-engine>=2.9.0a0,<2.12.0`), and of it only what megatron-core 0.16.1's TE
extension (`megatron/core/extensions/transformer_engine.py`) and its TE layer specs use:

* `pytorch.Linear`, `pytorch.LayerNormLinear`, `pytorch.GroupedLinear`, `pytorch.LayerNorm`,
  `pytorch.RMSNorm`, `pytorch.DotProductAttention`: TE's constructor signatures, plain torch
  forward code (tensor / sequence parallelism over `torch.distributed`, gloo included), and
  above all TE's own parameter attributes (`tensor_model_parallel`, `partition_dim`,
  `partition_stride`, `sequence_parallel`), set where and as TE sets them, each citing the TE
  line it reproduces. Those attributes are what muon-megatron must not trust (issue 22).
* the names megatron-core's extension touches when it is imported (`fp8`, `common.recipe`,
  `distributed.CudaRNGStatesTracker`, `ops`, `router`, `tensor.QuantizedTensor`).

Out of reach here, and refused where they would be used: FP8 / FP4 (`fp8_autocast(enabled=
True)`), TE's op fuser (`ops.Sequential`, megatron's `--use-te-op-fuser`), fused routers and
permutation, `parameters_split`, context parallelism in `DotProductAttention`, THD / packed
sequences, userbuffer overlap, delayed weight-gradient compute. Everything else megatron-core
might import (`pytorch.optimizers`, `cpp_extensions`, `permutation`, ...) is absent, so
megatron-core's own `except ImportError` fallbacks run, as they would with a TE that lacks
them.
"""

__version__ = "2.11.0"

from . import common, pytorch  # noqa: E402,F401
