"""llm_service: the process that runs the language model (gRPC LLMService)."""

from mmserve.omp import sleep_idle_workers

sleep_idle_workers()
