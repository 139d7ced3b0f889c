"""What `GraphRunner.capture()` did, per size: time, pool memory added, graph nodes."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import List

MiB = 1024 * 1024


@dataclass
class SizeReport:
    size: int
    capture_ms: float
    pool_bytes_added: int
    num_nodes: int


@dataclass
class CaptureReport:
    sizes: List[SizeReport] = field(default_factory=list)
    warmup_ms: float = 0.0
    rank: int = 0
    ranks: List["CaptureReport"] = field(default_factory=list)  # every rank's report, in a distributed run

    @property
    def capture_s(self) -> float:
        return sum(r.capture_ms for r in self.sizes) / 1000

    @property
    def pool_bytes(self) -> int:
        return sum(r.pool_bytes_added for r in self.sizes)

    def summary(self) -> str:
        text = (f"captured {len(self.sizes)} sizes in {self.capture_s:.2f} s (warm-up {self.warmup_ms:.0f} ms), "
                f"pool {self.pool_bytes / MiB:.1f} MiB")
        if self.ranks:
            slowest = max(self.ranks, key=lambda r: r.capture_s)
            text += (f" on rank {self.rank} of {len(self.ranks)}; slowest rank {slowest.rank} "
                     f"{slowest.capture_s:.2f} s, largest pool {max(r.pool_bytes for r in self.ranks) / MiB:.1f} MiB")
        return text

    def to_dict(self) -> dict:
        return {"rank": self.rank, "sizes": [asdict(r) for r in self.sizes], "warmup_ms": self.warmup_ms,
                "capture_s": self.capture_s, "pool_bytes": self.pool_bytes,
                "ranks": [r.to_dict() for r in self.ranks]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def __str__(self) -> str:
        lines = [f"{'size':>6} {'capture ms':>11} {'pool MiB added':>15} {'nodes':>6}"]
        lines += [f"{r.size:>6} {r.capture_ms:>11.2f} {r.pool_bytes_added / MiB:>15.2f} {r.num_nodes:>6}"
                  for r in self.sizes]
        return "\n".join(lines + [self.summary()])
