"""Native pieces compiled on first use against the installed jaxlib (asura.native.uninitialised)."""
