"""vision_service: the process that turns images into embeddings (gRPC VisionService)."""
