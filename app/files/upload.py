"""A `multipart/form-data` upload, streamed: the file part goes straight to a temporary
file as it arrives, so a 200 MB upload never sits in memory (nor in the system's temp
directory, as Starlette's form parser would put it: the files directory may be the only
volume with room). The parsing and the writing run in a worker thread, a batch of
received chunks at a time, so neither stalls the event loop.

The size limit holds while streaming: on the declared length before anything is read,
on the bytes received, and on the file part itself; whichever is crossed first is a 413.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import Headers

from app.errors import InvalidRequestError, PayloadTooLargeError
from app.files.storage import TempFile

FILE_FIELD = "file"
FORM_OVERHEAD = 64 * 1024  # the other fields, part headers and boundaries, at most
MAX_FIELD_BYTES = 4096
MAX_FIELDS = 16
FEED_BYTES = 1024 * 1024  # received bytes handed to the parser per thread hop
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(slots=True)
class Upload:
    fields: dict[str, str]
    filename: str | None  # None: the form had no `file` part
    size: int  # bytes of the file part


def too_large(max_bytes: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"The file is larger than this gateway accepts ({max_bytes} bytes).",
        param=FILE_FIELD,
        code="file_too_large",
    )


def _bad(message: str, param: str | None = None) -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code="invalid_request")


@dataclass(slots=True)
class _Form:
    """python-multipart's callbacks: the fields kept, the file part written to `temp`."""

    temp: TempFile
    max_bytes: int
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    ended: bool = False
    _header: bytes = b""
    _value: bytes = b""
    _disposition: bytes = b""
    _name: str = ""
    _in_file: bool = False
    _data: bytearray = field(default_factory=bytearray)

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": self.header_field,
            "on_header_value": self.header_value,
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
            "on_end": self.end,
        }

    def part_begin(self) -> None:
        self._disposition, self._name, self._in_file = b"", "", False
        self._data.clear()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def header_end(self) -> None:
        if self._header.lower() == b"content-disposition":
            self._disposition = self._value
        self._header, self._value = b"", b""

    def headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise _bad("Every part of the form needs a name (Content-Disposition).")
        self._name = options[b"name"].decode("utf-8", "replace")
        if b"filename" not in options:
            if len(self.fields) >= MAX_FIELDS:
                raise _bad("The form has too many fields.")
            return
        if self._name != FILE_FIELD:
            raise _bad(f"Unexpected file in field {self._name!r}: send it as `file`.", self._name)
        if self.filename is not None:
            raise _bad("Send one file per upload.", FILE_FIELD)
        # Some clients send the whole client-side path; only its last part is a name.
        name = options[b"filename"].decode("utf-8", "replace").replace("\\", "/")
        # Control characters have no business in a name (and PostgreSQL stores no NUL).
        name = _CONTROL.sub("_", name.rsplit("/", 1)[-1])
        self.filename = name[:256] or "file"
        self._in_file = True

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            if self.temp.size + (end - start) > self.max_bytes:
                raise too_large(self.max_bytes)
            self.temp.write(data[start:end])
        else:
            self._data += data[start:end]
            if len(self._data) > MAX_FIELD_BYTES:
                raise _bad(f"The field {self._name!r} is too long.", self._name)

    def part_end(self) -> None:
        if not self._in_file:
            try:
                self.fields[self._name] = self._data.decode("utf-8")
            except UnicodeDecodeError:
                raise _bad(f"The field {self._name!r} is not UTF-8.", self._name) from None

    def end(self) -> None:
        self.ended = True


def _boundary(headers: Headers) -> bytes:
    kind, options = parse_options_header(headers.get("content-type"))
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise _bad("Upload the file as multipart/form-data (fields `file` and `purpose`).")
    return options[b"boundary"]


def check_length(headers: Headers, max_bytes: int) -> None:
    """Refuse a body declared too large before reading any of it."""
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes + FORM_OVERHEAD:
        raise too_large(max_bytes)


async def receive_upload(
    headers: Headers, stream: AsyncIterator[bytes], temp: TempFile, max_bytes: int
) -> Upload:
    """Read the form from `stream`, its file part into `temp` (then finished: flushed,
    synced and closed). Raises OpenAI-shaped 400s and 413s."""
    form = _Form(temp, max_bytes)
    try:
        parser = MultipartParser(_boundary(headers), form.callbacks())  # type: ignore[arg-type]
    except FormParserError as e:
        raise _bad(f"Invalid multipart boundary ({e}).") from None
    received = 0
    pending: list[bytes] = []
    pending_bytes = 0

    def feed(chunks: list[bytes]) -> None:
        try:
            for chunk in chunks:
                parser.write(chunk)
        except FormParserError as e:
            raise _bad(f"Invalid multipart body ({e}).") from None

    async for chunk in stream:
        received += len(chunk)
        if received > max_bytes + FORM_OVERHEAD:
            raise too_large(max_bytes)
        pending.append(chunk)
        pending_bytes += len(chunk)
        if pending_bytes >= FEED_BYTES:
            await asyncio.to_thread(feed, pending)
            pending, pending_bytes = [], 0
    await asyncio.to_thread(feed, pending)
    if not form.ended:
        raise _bad("The multipart body ended early (no closing boundary).")
    await asyncio.to_thread(temp.finish)
    return Upload(form.fields, form.filename, temp.size)
