"""Tuned settings: the record `sparrow bench --tune` writes for a model on one device (schema, the device
fingerprint) and TunedSettings, which validates and reads it (drafters and their options against runtime.drafters'
registry)."""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from ..drafters import DRAFTERS, check_options
from .errors import TunedSettingsError
from .registry import NAME_RE

TUNED_SCHEMA = "sparrow.tuned/1"


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


@dataclass(frozen=True)
class TunedSettings:
    """Settings chosen by `sparrow bench --tune` for one model on one device.
    drafter: a name in runtime.drafters.DRAFTERS or the store name of a draft model; drafter_options: keyword
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
        if not isinstance(drafter, str) or not (drafter in DRAFTERS or NAME_RE.fullmatch(drafter)):
            raise TunedSettingsError(f"drafter must be {', '.join(DRAFTERS)} or a draft model's store name, "
                                     f"got {drafter!r}")
        try:
            options = check_options(drafter, s.get("drafter_options", {}))
        except (TypeError, ValueError) as e:
            raise TunedSettingsError(str(e)) from None
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
