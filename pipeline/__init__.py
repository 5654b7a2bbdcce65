"""The in-process Python API (rtp-llm style): ModelFactory, Pipeline; wires the vision and LLM halves in one process."""
