"""Looped-depth transformer: `LoopedLM` (looped.py) and its pieces.

Imported lazily so that the registries in submodules (asura.model.remat, .attention,
.adapter_registry) can be read by config validation without building Flax modules.
"""


def __getattr__(name: str):
    if name == "LoopedLM":
        from asura.model.looped import LoopedLM

        return LoopedLM
    raise AttributeError(name)


__all__ = ["LoopedLM"]
