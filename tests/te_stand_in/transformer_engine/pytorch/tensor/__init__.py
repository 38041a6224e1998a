"""`QuantizedTensor`: the class megatron-core's fp8_utils tests parameters against. No
parameter here is ever one (FP8 is out of reach on CPU)."""

__all__ = ["QuantizedTensor"]


class QuantizedTensor:
    """Never instantiated: `isinstance(param, QuantizedTensor)` is False for every param."""

    def __init__(self, *args, **kwargs) -> None:
        raise NotImplementedError("FP8 tensors are out of reach in the TE stand-in (CPU)")
