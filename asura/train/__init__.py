"""Training: `from asura.train import run; summary = run(cfg, workdir)` (see asura.train.loop)."""


def __getattr__(name: str):
    # Lazy, so `import asura.train` stays cheap (no JAX) for CLIs that only parse configs.
    if name in ("run", "NonFiniteError", "FAST_COMPILE"):
        from asura.train import loop

        return getattr(loop, name)
    raise AttributeError(name)
