"""What a Muon step costs at scale, computed from a built optimizer's own plan.

`hardware` describes the GPU and network; `figures` reads every grid member's share of the
plan (matrices owned, Newton-Schulz FLOPs, bytes sent and received per bucket, memory);
`events` runs the pipeline's issue order (`optimizer.pipeline.run_pipeline`'s own trace)
through an event model of streams and in-order collectives; `alternatives` gives the same
figures for megatron-core's own Muon and Moonlight's scheme; `report` prints and judges them.
Nothing here runs a collective: the planner and a real run's start-up log both use it.
"""
