"""`transformer_engine.common`: only `recipe`, which megatron-core subclasses at import."""

from . import recipe  # noqa: F401
