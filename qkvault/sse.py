"""Reading a ``text/event-stream`` (server-sent events, as the WHATWG HTML standard defines them).

Plain parsing, no HTTP: :class:`SseParser` is fed the stream's lines (``httpx``'s ``iter_lines()``
already splits on CR, LF and CRLF) and yields one :class:`SseMessage` per dispatched message.
Comments (``: keep-alive``) are not messages; ``retry:`` updates :attr:`SseParser.retry_ms` even in
a block without data, as the standard says.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class SseMessage:
    """One message: ``event`` (``"message"`` when the server named none), ``data`` (its ``data:``
    lines joined with newlines) and the ``id:`` last seen."""

    event: str
    data: str
    id: str = ""


class SseParser:
    """Turns lines of an event stream into messages; keeps ``retry_ms`` (the server's reconnection
    delay, ``None`` until it sent one), ``last_id`` and ``comments`` (how many comment lines came,
    keep-alives included)."""

    def __init__(self) -> None:
        self.retry_ms: int | None = None
        self.last_id = ""
        self.comments = 0
        self._event = ""
        self._data: list[str] = []

    def feed(self, lines: Iterable[str]) -> Iterator[SseMessage]:
        for line in lines:
            message = self.line(line)
            if message is not None:
                yield message

    def line(self, line: str) -> SseMessage | None:
        """Take one line (without its end of line); a blank line dispatches the message so far."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None  # unknown fields are ignored

    def _dispatch(self) -> SseMessage | None:
        event, data = self._event or "message", self._data
        self._event, self._data = "", []
        if not data:
            return None
        return SseMessage(event=event, data="\n".join(data), id=self.last_id)
