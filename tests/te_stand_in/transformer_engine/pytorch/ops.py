"""TE's op fuser (`te.pytorch.ops`): out of reach. megatron-core names `Sequential` and
`FusibleOperation` in annotations at import (`TEFusedMLP`); building one is refused."""

__all__ = ["FusibleOperation", "Sequential"]


class FusibleOperation:
    def __init__(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            "TE's op fuser is out of reach in the TE stand-in: drop --use-te-op-fuser"
        )


class Sequential(FusibleOperation):
    pass
