"""Energy from RAPL counters (Linux powercap): /sys/class/powercap/intel-rapl:N/energy_uj, one package domain per N
(AMD Zen exposes its package counters under the same name on kernels >= 5.8). Only the top-level domains are summed:
their sub-domains (intel-rapl:N:M, cores/uncore/dram) are parts of the package figure and would count twice.

    meter, reason = Rapl.open()        # meter is None and reason says why when nothing can be read
    before = meter.read()
    ...                                # the work to measure
    joules = meter.joules(before, meter.read())

Counters wrap at max_energy_range_uj; one wrap between two reads is undone. The reading covers the whole package,
so whatever else runs on the machine is counted too: the report says so.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

POWERCAP = Path("/sys/class/powercap")
_TOP_LEVEL = re.compile(r"intel-rapl:\d+$")


@dataclass
class Domain:
    path: Path
    name: str        # "package-0", ...
    max_uj: int      # the counter wraps to 0 after this


class Rapl:
    def __init__(self, domains: list[Domain]):
        self.domains = domains

    @classmethod
    def open(cls, root: Path = POWERCAP) -> tuple[Rapl | None, str]:
        """The readable top-level RAPL domains under `root`, or (None, why not)."""
        dirs = sorted(d for d in root.glob("intel-rapl:*") if _TOP_LEVEL.fullmatch(d.name)) if root.is_dir() else []
        if not dirs:
            return None, (f"no RAPL counters ({root}/intel-rapl:* absent: the platform, VM or kernel does not expose "
                          "them)")
        domains = []
        for d in dirs:
            try:
                int((d / "energy_uj").read_text())
                max_uj = int((d / "max_energy_range_uj").read_text())
                name = (d / "name").read_text().strip() if (d / "name").is_file() else d.name
            except PermissionError:
                return None, (f"{d / 'energy_uj'} is not readable by this user (root-only on Linux >= 5.10; "
                              "run as root or make it readable)")
            except (OSError, ValueError) as e:
                return None, f"{d} could not be read: {e}"
            domains.append(Domain(d, name, max_uj))
        return cls(domains), ""

    def read(self) -> list[int]:
        """Microjoules per domain, now."""
        return [int((d.path / "energy_uj").read_text()) for d in self.domains]

    def joules(self, before: list[int], after: list[int]) -> float:
        total = 0
        for d, a, b in zip(self.domains, before, after):
            total += b - a if b >= a else b + d.max_uj + 1 - a  # the counter wrapped once
        return total / 1e6

    def describe(self) -> str:
        return "RAPL " + ", ".join(f"{d.name} ({d.path.name})" for d in self.domains)
