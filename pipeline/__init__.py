"""The in-process Python API (rtp-llm's shape); the one place that wires the vision and LLM halves into one process.

model = ModelFactory.from_huggingface("/path/to/checkpoint")
pipeline = Pipeline(model, model.tokenizer)
for res in pipeline("USER: <image>\\nWhat is this? ASSISTANT:", urls=[url], generate_config={"top_k": 1}):
    print(res.batch_response)
pipeline.stop()
"""

from pipeline.factory import ModelFactory, MultimodalModel
from pipeline.pipeline import Pipeline, PipelineResponse
from pipeline.settings import settings_from_generate_config

__all__ = ["ModelFactory", "MultimodalModel", "Pipeline", "PipelineResponse", "settings_from_generate_config"]
