"""Progress display without extra dependencies.

- a terminal (stderr is a tty): one line rewritten in place with ``\\r``;
- Jupyter (ipykernel running): one output cell updated in place through IPython's display handle;
- anything else (CI logs, pipes): plain lines, printed when the state changes and at most every
  ``min_interval_s`` otherwise.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Hashable
from typing import Any, TextIO


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class ProgressLine:
    """Write a status line that changes over time; call :meth:`close` when done."""

    def __init__(self, stream: TextIO | None = None, *, min_interval_s: float = 10.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream)
        self.min_interval_s = min_interval_s
        self._width = 0
        self._last_text: str | None = None
        self._last_key: Hashable = object()
        self._last_print_s = 0.0
        self._handle: Any = None
        self._held: str | None = None  # plain-line mode: latest text not printed yet
        if not self.tty and stream is None and "ipykernel" in sys.modules:
            try:
                from IPython.display import display

                self._handle = display({"text/plain": ""}, raw=True, display_id=True)
            except Exception:  # no IPython display available: fall back to plain lines
                self._handle = None

    def update(self, text: str, *, key: Hashable = None, force: bool = False) -> None:
        """Show ``text``. Plain-line mode prints it when ``key`` changed, when forced, or after
        ``min_interval_s`` — so a CI log gets one line per phase, not one per poll."""
        if text == self._last_text and not force:
            return
        if self._handle is not None:
            self._handle.update({"text/plain": text}, raw=True)
        elif self.tty:
            pad = max(self._width - len(text), 0)
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
            self._width = len(text)
        else:
            now = time.monotonic()
            if not (force or key != self._last_key or now - self._last_print_s >= self.min_interval_s):
                self._held = text
                return
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_print_s = now
            self._held = None
        self._last_key = key
        self._last_text = text

    def close(self, final_text: str | None = None) -> None:
        """Show ``final_text`` (or the last text, if it was held back) and end the line."""
        if final_text is not None:
            self.update(final_text, force=True)
        elif self._held is not None:
            self.update(self._held, force=True)
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
