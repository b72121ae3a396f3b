"""One adapter per provider kind, sharing the process's upstream HTTP session."""

from __future__ import annotations

import aiohttp

from app.errors import InvalidRequestError
from app.providers.anthropic import AnthropicProvider
from app.providers.base import Provider
from app.providers.gemini import GeminiProvider
from app.providers.mock import MockProvider
from app.providers.openai import OPENAI_BASE, OpenAIProvider


class ProviderRegistry:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._providers: dict[str, Provider] = {
            "openai": OpenAIProvider(session, default_base=OPENAI_BASE),
            "openai_compatible": OpenAIProvider(session, default_base=None),
            "anthropic": AnthropicProvider(session),
            "gemini": GeminiProvider(session),
            "mock": MockProvider(),
        }

    def get(self, name: str) -> Provider:
        try:
            return self._providers[name]
        except KeyError:
            raise InvalidRequestError(f"unknown provider {name!r}") from None
