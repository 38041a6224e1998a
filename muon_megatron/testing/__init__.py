"""Test-only support: CPU shims for megatron-core and a multi-process launcher.

Nothing here is imported by the optimizer itself; a GPU run never loads these modules.
"""
