"""Tuned settings: the record `sparrow bench --tune` writes for a model on one device (schema, drafters and their
options, the device fingerprint) and TunedSettings, which validates and reads it."""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TunedSettingsError
from .registry import NAME_RE

TUNED_SCHEMA = "sparrow.tuned/1"
BUILTIN_DRAFTERS = ("none", "prompt-lookup", "recycling", "hybrid")
# Options each drafter's constructor takes (runtime.drafters), and their types: int or a list of ints.
DRAFTER_OPTIONS: dict[str, dict[str, type]] = {
    "prompt-lookup": {"ngram": int, "min_ngram": int, "k": int},
    "recycling": {"k": int, "branching": list, "max_nodes": int},
    "hybrid": {"lookup_k": int, "ngram": int, "min_ngram": int, "k": int, "branching": list, "max_nodes": int},
    "draft-model": {"k": int, "alternatives": int},
}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")) and ":" in line:
                value = line.split(":", 1)[1].strip()
                if value:
                    return value
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_fingerprint() -> dict[str, object]:
    """What tuned settings depend on: CPU model, architecture and core counts. Settings measured where these differ
    are not used."""
    import psutil

    return {"cpu_model": _cpu_model(), "arch": platform.machine(),
            "physical_cores": psutil.cpu_count(logical=False) or os.cpu_count() or 1,
            "logical_cores": psutil.cpu_count(logical=True) or os.cpu_count() or 1}


def describe_device(d: dict) -> str:
    return (f"{d.get('cpu_model', '?')}, {d.get('physical_cores', '?')} physical / {d.get('logical_cores', '?')} "
            f"logical cores, {d.get('arch', '?')}")


def _check_options(drafter: str, options: object) -> dict[str, object]:
    if not isinstance(options, dict):
        raise TunedSettingsError("drafter_options must be an object")
    if drafter == "none":
        if options:
            raise TunedSettingsError("drafter 'none' takes no options")
        return {}
    allowed = DRAFTER_OPTIONS.get(drafter, DRAFTER_OPTIONS["draft-model"])
    out: dict[str, object] = {}
    for key, value in options.items():
        kind = allowed.get(key)
        if kind is None:
            raise TunedSettingsError(f"unknown option {key!r} for drafter {drafter!r} (known: {', '.join(allowed)})")
        values = value if kind is list else [value]
        if (kind is list and (not isinstance(value, list) or not value)) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
            raise TunedSettingsError(f"drafter option {key}={value!r} must be "
                             + ("a non-empty list of positive integers" if kind is list else "a positive integer"))
        out[key] = list(value) if kind is list else value
    if drafter in ("recycling", "hybrid") and "branching" in out and max(out["branching"]) > out.get("k", 8):
        raise TunedSettingsError("recycling: every branching factor must be <= k")
    return out


@dataclass(frozen=True)
class TunedSettings:
    """Settings chosen by `sparrow bench --tune` for one model on one device.
    drafter: "none", "prompt-lookup", "recycling", or the store name of a draft model; drafter_options: keyword
    arguments for its constructor (e.g. {"branching": [1], "max_nodes": 4}). record: the whole stored record
    (measurements, search settings)."""

    threads: int
    drafter: str
    drafter_options: dict[str, object]
    device: dict[str, object]
    model_sha256: str
    created: str
    record: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_record(cls, record: object) -> TunedSettings:
        """Validate a stored record; TunedSettingsError saying what is wrong."""
        if not isinstance(record, dict):
            raise TunedSettingsError("not a JSON object")
        if record.get("schema") != TUNED_SCHEMA:
            raise TunedSettingsError(f"schema is {record.get('schema')!r}, expected {TUNED_SCHEMA!r}")
        s, device = record.get("settings"), record.get("device")
        if not isinstance(s, dict) or not isinstance(device, dict):
            raise TunedSettingsError("'settings' and 'device' must be objects")
        threads, drafter = s.get("threads"), s.get("drafter")
        if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 512:
            raise TunedSettingsError(f"threads must be an integer 1..512, got {threads!r}")
        if not isinstance(drafter, str) or not (drafter in BUILTIN_DRAFTERS or NAME_RE.match(drafter)):
            raise TunedSettingsError(f"drafter must be none, prompt-lookup, recycling or a store name, got {drafter!r}")
        options = _check_options(drafter, s.get("drafter_options", {}))
        sha, created = record.get("model_sha256"), record.get("created")
        if not isinstance(sha, str) or not isinstance(created, str):
            raise TunedSettingsError("'model_sha256' and 'created' must be strings")
        return cls(threads=threads, drafter=drafter, drafter_options=options, device=device, model_sha256=sha,
                   created=created, record=record)

    def describe(self) -> str:
        """e.g. "2 threads, recycling (branching=[1], max_nodes=4)"."""
        opts = ", ".join(f"{k}={v}" for k, v in self.drafter_options.items())
        drafter = "no drafter" if self.drafter == "none" else self.drafter + (f" ({opts})" if opts else "")
        return f"{self.threads} thread{'s' if self.threads != 1 else ''}, {drafter}"
