"""gateway: the HTTP edge process (OpenAI REST API), and the in-process Python API (gateway.pipeline)."""

from mmserve.omp import sleep_idle_workers

sleep_idle_workers()
