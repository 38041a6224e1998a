"""Total and active parameters of the model that pretrain_moe.py flags describe.

    python examples/count_params.py --num-layers 27 --hidden-size 2048 ... (same flags)

Cited in moonlight_multinode.sbatch; the count is checked against a built megatron-core
model in tests/unit_tests/test_model_size.py.
"""

import sys

from muon_megatron.training.args import build_parser
from muon_megatron.training.model_size import count_parameters


def main(argv: list[str]) -> int:
    count = count_parameters(build_parser().parse_args(argv))
    print(f"total parameters:  {count.total:>15,d}  ({count.total / 1e9:.2f} B)")
    print(f"active per token:  {count.active:>15,d}  ({count.active / 1e9:.2f} B)")
    print(f"  embedding+output {count.embedding:>15,d}")
    print(f"  on Muon (2-D)    {count.muon:>15,d}  ({count.muon / count.total:.1%} of total)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
