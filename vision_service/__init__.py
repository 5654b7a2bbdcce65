"""vision_service: the process that turns images into embeddings (gRPC VisionService)."""

import mmserve.proto  # noqa: F401  (fails at once, naming `make protos`, when the stubs were not built)
from mmserve.omp import sleep_idle_workers

sleep_idle_workers()
