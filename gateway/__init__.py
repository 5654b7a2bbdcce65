"""gateway: the HTTP edge process, the OpenAI-compatible REST API (gateway.http) over the serving core."""

import mmserve.proto  # noqa: F401  (fails at once, naming `make protos`, when the stubs were not built)
from mmserve.omp import sleep_idle_workers

sleep_idle_workers()
