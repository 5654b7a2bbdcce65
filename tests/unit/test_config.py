import pytest

from gateway.config import GatewayConfig
from llm_service.config import LLMConfig
from vision_service.config import VisionConfig


def test_flags_override_env_and_env_overrides_defaults(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("LLM_MAX_RUNNING", "3")
    monkeypatch.setenv("LLM_PORT", "6000")
    config = LLMConfig.from_args(["--checkpoint", str(tiny_checkpoint), "--port", "7000"])
    assert (config.engine.max_running, config.port, config.engine.max_waiting) == (3, 7000, 256)


def test_gateway_media_policy_from_flags_and_env(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("ALLOWED_MEDIA_DOMAINS", "Example.com, cdn.example.org")
    config = GatewayConfig.from_args(
        [
            "--checkpoint",
            str(tiny_checkpoint),
            "--vision",
            "vision:1",
            "--fetch-timeout",
            "3",
            "--allow-private-urls",
        ]
    )
    assert config.vision_addr == "vision:1" and config.tokenizer_path == str(tiny_checkpoint)
    assert config.media.fetch_timeout_s == 3 and config.media.allow_private_urls
    assert config.media.allowed_domains == ["example.com", "cdn.example.org"]
    assert config.model_name == "tiny-llava"


def test_bad_values_are_refused(tiny_checkpoint, monkeypatch):
    with pytest.raises(ValueError, match="dtype"):
        VisionConfig(checkpoint=str(tiny_checkpoint), dtype="int8")
    with pytest.raises(ValueError, match="preprocess_mode"):
        VisionConfig(checkpoint=str(tiny_checkpoint), preprocess_mode="fork")
    with pytest.raises(ValueError, match="does not exist"):
        LLMConfig(checkpoint="/no/such/folder")
    monkeypatch.setenv("VISION_COMPILE", "1")
    assert VisionConfig.from_args(["--checkpoint", str(tiny_checkpoint)]).compile
