"""The embeddings request, as OpenAI defines it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    # OpenAI's own limits: at most 2048 inputs, vectors of at most 3072 dimensions.
    input: str | list[str] | list[int] | list[list[int]] = Field(max_length=2048)
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1, le=4096)
    user: str | None = None

    @property
    def texts(self) -> list[str]:
        """The inputs as strings; token arrays are kept as their printed form."""
        if isinstance(self.input, str):
            return [self.input]
        if all(isinstance(item, str) for item in self.input):
            return [str(item) for item in self.input]
        if all(isinstance(item, int) for item in self.input):
            return [" ".join(str(t) for t in self.input)]
        return [" ".join(str(t) for t in item) for item in self.input if isinstance(item, list)]


EMBEDDING_REQUEST = TypeAdapter(EmbeddingRequest)
