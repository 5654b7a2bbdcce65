"""gateway: the HTTP edge process, the OpenAI-compatible REST API (gateway.http) over the serving core."""

from mmserve.omp import sleep_idle_workers

sleep_idle_workers()
