"""OpenMP policy for the service processes, applied before torch loads.

The three services share a machine's cores. By default libgomp's idle workers spin for a while after
each parallel region; on a few cores that spinning takes the CPU from the other processes streaming the
tokens (gRPC, the gateway), and the next parallel region then waits for a worker that was descheduled.
Sleeping idle workers made single-stream decode ~25% faster through the gateway on 2 cores
(benchmarks/RESULTS.md). A value the operator set is kept.
"""

import os
import sys


def sleep_idle_workers() -> None:
    if "torch" not in sys.modules:  # too late once torch (and libgomp) is loaded
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
