"""vision_service: the process that turns images into embeddings (gRPC VisionService)."""

from mmserve.omp import sleep_idle_workers

sleep_idle_workers()
