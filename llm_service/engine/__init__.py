"""The LLM engine: sequences, KV block manager, scheduler, model runner, and the engine loop."""

from llm_service.engine.config import EngineConfig
from llm_service.engine.llm_engine import Engine

__all__ = ["Engine", "EngineConfig"]
