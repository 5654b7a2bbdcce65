"""The engine benchmark's workload (one distinct image + a short question per request) and what is
measured of each request and run (token timestamps, TTFT, TPOT, percentiles, other processes' CPU use)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.bench_vision import photo_like

SUBJECTS = ("colours", "shapes", "objects", "textures", "patterns", "lines", "edges", "shadows")
# Image seeds: measured requests, single-stream requests and warm-ups never share an image, so no
# run is helped by the vision service's embedding cache (or an engine prefix cache) of another.
SINGLE_SEED, WARMUP_SEED = 1_000, 2_000


def question(i: int) -> str:
    """A short question that varies per request (~21 tokens with the anchor's tokenizer)."""
    return f"What {SUBJECTS[i % len(SUBJECTS)]} do you see in picture {i}?"


@dataclass
class Workload:
    images: list[bytes]  # JPEG bytes, one distinct image per request
    texts: list[str]

    @classmethod
    def make(cls, n: int, seed0: int) -> Workload:
        return cls([photo_like(seed0 + i) for i in range(n)], [question(i) for i in range(n)])


@dataclass
class RequestTiming:
    sent: float
    token_times: list[float] = field(default_factory=list)  # one entry per output token
    finished: float = 0.0
    completion_tokens: int | None = None  # from usage (mmserve) or counted (HF)
    prompt_tokens: int | None = None
    token_ids: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None


@dataclass
class RunResult:
    name: str
    requests: list[RequestTiming]
    wall_s: float  # first send to last finish (sequential runs: the sum, as they do not overlap)

    def summary(self) -> dict:
        ok = [r for r in self.requests if r.error is None and r.token_times]
        tokens = sum(len(r.token_times) for r in ok)
        ttfts = [r.ttft for r in ok]
        tpots = [t for t in (r.tpot for r in ok) if t is not None]
        return {
            "requests": len(self.requests),
            "ok": len(ok),
            "wall_s": self.wall_s,
            "output_tokens": tokens,
            "output_tok_per_s": tokens / self.wall_s,
            "req_per_s": len(ok) / self.wall_s,
            "ttft_p50_s": percentile(ttfts, 50),
            "ttft_p99_s": percentile(ttfts, 99),
            "tpot_p50_s": percentile(tpots, 50),
            "prompt_tokens": [r.prompt_tokens for r in self.requests],
        }


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class OtherLoad:
    """CPU time other processes used during a phase: machine busy time (/proc/stat) minus the CPU time
    of this process and everything below it, live or reaped (a server's own reaped children, such as
    vLLM's engine process, included). On a shared 2-core machine a concurrent test run skews every
    number here, so each phase reports it. None when /proc cannot be read."""

    def __init__(self):
        self.start = self._now()

    @staticmethod
    def _now() -> tuple[float, float, float] | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
            ours = _tree_cpu_s(os.getpid())
        except OSError:
            return None
        # user nice system idle iowait irq softirq steal: busy = all but idle and iowait
        ticks = [int(f) for f in fields[:8]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
        return time.perf_counter(), busy, ours

    def stop(self) -> dict | None:
        end = self._now()
        if self.start is None or end is None:
            return None
        wall = end[0] - self.start[0]
        others = max(0.0, (end[1] - self.start[1]) - (end[2] - self.start[2]))
        return {"other_cpu_s": others, "other_share": others / (wall * (os.cpu_count() or 1))}


def _tree_cpu_s(root: int) -> float:
    """CPU seconds of `root` and every live process below it, each with its reaped children's
    (utime + stime + cutime + cstime): a process that exits and is reaped meanwhile moves from its
    own fields to its parent's, so the sum only grows."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        cpu[pid] = sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid, seconds in cpu.items():
        node = pid
        while node not in (0, 1, root):
            node = parent.get(node, 0)
        if node == root:
            total += seconds
    return total
