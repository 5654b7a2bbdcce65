"""llm_service: the process that runs the language model (gRPC LLMService)."""
