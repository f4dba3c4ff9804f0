"""The tests' tokenizer: fastdpo.data.tiny_tokenizer (trained locally in well under a second)."""

from fastdpo.data.tiny_tokenizer import CHAT_TEMPLATE, build_tiny_tokenizer

__all__ = ["CHAT_TEMPLATE", "build_tiny_tokenizer"]
