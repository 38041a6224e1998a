"""Running megatron-core where it assumes CUDA: CPU shims and a multi-process launcher.

Applied by whoever launches on CPU (`launch.spawn`, the training entry without CUDA,
`python -m muon_megatron.megatron_lm` without CUDA), never at import. A GPU run never
loads `cpu_shims`.
"""
