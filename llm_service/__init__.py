"""llm_service: the process that runs the language model (gRPC LLMService)."""

import mmserve.proto  # noqa: F401  (fails at once, naming `make protos`, when the stubs were not built)
from mmserve.omp import sleep_idle_workers

sleep_idle_workers()
