"""The ZeRO-1 Muon optimizer: megatron-core's `DistributedOptimizer` with a Muon step.

`distributed` (the step, phase by phase), `plan` (matrices, DP ranges, buckets),
`ownership` and `grid` (who orthogonalizes what, and the all-to-all grid), and the mixins
`checkpoint_state` and `nonfinite`; `builder` is the `get_muon_optimizer` entry.
"""
