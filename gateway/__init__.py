"""gateway: the HTTP edge process (OpenAI REST API), and the in-process Python API (gateway.pipeline)."""
