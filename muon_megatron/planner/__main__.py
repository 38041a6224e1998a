"""`python -m muon_megatron.planner [--prog=NAME] <flags>`: the planner's child process."""

import sys

from muon_megatron.planner.run import main

argv = sys.argv[1:]
prog = "muon-megatron plan"
if argv and argv[0].startswith("--prog="):
    prog = argv.pop(0).split("=", 1)[1]
sys.exit(main(argv, prog))
