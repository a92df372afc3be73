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
