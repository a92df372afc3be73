"""The store's errors: each says what to do."""
from __future__ import annotations


class StoreError(RuntimeError):
    """A store operation failed; the message says what to do."""


class UnknownModelError(StoreError):
    pass


class ChecksumError(StoreError):
    pass


class InsufficientMemoryError(StoreError):
    pass


class TunedSettingsError(StoreError):
    """A tuned-settings record is malformed; the message says what is wrong."""


class ManifestError(StoreError):
    """A manifest.json is not one Sparrow can use; the message says what is wrong with it."""


class BrokenModelError(StoreError):
    """A folder in the store's models/ is not a usable model (no manifest, a bad one, a file outside it, a file of
    the wrong size); `reason` says why. `sparrow models list` shows it, `sparrow models rm` removes it."""

    def __init__(self, name: str, reason: str):
        shown = name if name.isprintable() else repr(name)
        super().__init__(f"model {name!r} in the store is broken: {reason}. Remove it with `sparrow models rm "
                         f"{shown}` and pull it again")
        self.name = name
        self.reason = reason
