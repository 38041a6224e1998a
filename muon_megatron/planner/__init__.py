"""`muon-megatron plan`: what Muon will cost on a large cluster, from the optimizer's own plan.

`world` builds one rank per pipeline stage of the user's world in this process (megatron-core's
model and our optimizer, on the meta device, over torch's fake process group); `run` turns
the built optimizers into the figures of `muon_megatron.costmodel` and prints them.
"""
