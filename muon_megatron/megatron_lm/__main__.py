"""`python -m muon_megatron.megatron_lm pretrain_gpt.py [args...]`."""

from muon_megatron.megatron_lm.hooks import main

main()
