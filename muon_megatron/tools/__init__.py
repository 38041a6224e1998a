"""Tools on top of the optimizer, the training layer and the harness: `cli` (`muon-megatron`),
`verify`, and `bench` (`bench_config`, `bench_rank` what each rank measures, `bench_report`
the table) with `comm_counter`."""
