"""Tools on top of the optimizer, the training layer and the harness: `cli` (`muon-megatron`),
`verify`, and `bench` (`bench_config`, `bench_rank` what each rank measures, `bench_report`
the table) with `comm_counter`; `step_probe` (the torch operators and host time of one rank's
step, for `benchmarks/host_cost.py` and the tests)."""
