"""How busy processes outside the benchmark kept the CPUs during a measured phase: machine busy time
(/proc/stat) minus the CPU time of this process and all its live descendants (/proc/<pid>/stat).
engine_measure.OtherLoad counts only reaped children, which misses vLLM's engine process (a
grandchild) and any server still running when the phase ends."""

from __future__ import annotations

import os
import time
from pathlib import Path


def _busy_s() -> float:
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_s(root: int) -> float:
    """utime + stime of `root` and every live process below it."""
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
        cpu[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid, seconds in cpu.items():
        node = pid
        while node not in (0, 1, root):
            node = parent.get(node, 0)
        if node == root:
            total += seconds
    return total


class PhaseLoad:
    """Start it when a measured phase starts (servers already up), stop it before they stop."""

    def __init__(self) -> None:
        self.start = (time.perf_counter(), _busy_s(), _tree_cpu_s(os.getpid()))

    def stop(self) -> dict:
        wall, busy, ours = (
            now - then
            for now, then in zip(
                (time.perf_counter(), _busy_s(), _tree_cpu_s(os.getpid())), self.start, strict=True
            )
        )
        others = max(0.0, busy - ours)
        return {
            "other_cpu_s": others,
            "other_share": others / (wall * (os.cpu_count() or 1)),
            "ours_cpu_s": ours,
        }
