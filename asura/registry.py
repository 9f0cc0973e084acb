"""Registries: the allowed values of one config key, listed once, each carrying its facts.

A registry maps a name (what a user writes in a config) to an entry (whatever the
implementing module needs: a function, a class, a dataclass of facts). The config
schema, the CLI errors and the docs read the names from here, so adding an entry is
the only step needed to make a new value valid::

    POLICIES = Registry("model.remat", "what the iteration loop keeps for the backward pass")
    POLICIES.add("none", RematPolicy(...))

Pure python: importing a registry module must stay cheap enough for config validation.
"""

from __future__ import annotations

from collections.abc import Iterator


class Registry[T]:
    def __init__(self, key: str, what: str = ""):
        self.key = key  # the dotted config key whose values these are, e.g. "model.remat"
        self.what = what  # one-line description for docs and --help
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.key}: {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str):
        """Decorator form of `add`."""

        def deco(entry: T) -> T:
            return self.add(name, entry)

        return deco

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def invalid(self, value: object) -> str:
        """The one-line message for a value that is not registered."""
        return f"{self.key}={value!r} is not valid; choose one of {', '.join(self._entries)}"

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(self.invalid(name)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self):
        return self._entries.items()

    def __repr__(self) -> str:
        return f"Registry({self.key!r}: {', '.join(self._entries)})"
