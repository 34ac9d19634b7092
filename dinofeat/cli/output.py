"""How the command line writes: escaped text, plural forms and one progress rule.

- Text that comes from files (paths, model names, index headers) can hold terminal control
  characters; printed raw, an ESC sequence can rewrite the screen or the window title.
  Everything the CLI prints goes through :func:`safe`, which shows such characters as
  ``\\x1b``-style escapes (newlines and tabs stay).
- Progress: a bar on a terminal; elsewhere (a pipe, a log file) one plain line when a bar
  starts, then at most one every ``DINOFEAT_PROGRESS_INTERVAL`` seconds (default 30), and
  its final state: :class:`PlainProgressStream` turns the redraws of tqdm bars (the
  library's and the CLI's own) into such lines.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any, TextIO

__all__ = ["safe", "plural", "Progress", "EscapingStream", "PlainProgressStream",
           "install_output", "progress_interval"]

# C0 controls except tab and newline, DEL, the C1 controls, and the lone surrogates
# that stand for C1 bytes in non-UTF-8 file names (surrogateescape).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\udc80-\udc9f]")


def _escape(m: re.Match) -> str:
    code = ord(m.group(0))
    return f"\\x{code - 0xdc00 if code >= 0xdc00 else code:02x}"


def safe(value: Any) -> str:
    """``str(value)`` with terminal control characters shown as ``\\xNN`` escapes."""
    return _CONTROL.sub(_escape, str(value))


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 image``, ``2 images`` (``words`` for irregular plurals)."""
    return f"{n:,} {word if n == 1 else (words or word + 's')}"


def progress_interval() -> float:
    try:
        return max(0.0, float(os.environ.get("DINOFEAT_PROGRESS_INTERVAL", "30")))
    except ValueError:
        return 30.0


class EscapingStream:
    """A text stream that escapes control characters on the way through."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(safe(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class PlainProgressStream(EscapingStream):
    """stderr for a pipe or a file: tqdm's carriage-return redraws become whole lines, at
    most one per :func:`progress_interval` seconds plus the first and the last state of
    each bar; everything else passes through escaped."""

    def __init__(self, stream: TextIO, interval: float | None = None):
        super().__init__(stream)
        self._interval = progress_interval() if interval is None else interval
        self._pending: str | None = None  # the latest redraw not written yet
        self._in_bar = False  # a bar has drawn itself and not ended its line yet
        self._last = float("-inf")

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        head, *redraws = text.split("\r")
        if head.startswith("\n") and self._in_bar:  # a bar finished: its final state
            if self._pending is not None:
                self._stream.write(safe(self._pending) + "\n")
            self._pending, self._in_bar, head = None, False, head[1:]
        if head:
            self._stream.write(safe(head))
        for part in redraws:
            if part.endswith("\n"):  # a message written between redraws (tqdm.write)
                self._stream.write(safe(part))
                continue
            state = part.rstrip()
            if not state:  # a bar clearing itself
                self._pending, self._in_bar = None, False
                continue
            now = time.monotonic()
            if not self._in_bar or now - self._last >= self._interval:
                self._stream.write(safe(state) + "\n")
                self._last, self._pending = now, None
            else:
                self._pending = state
            self._in_bar = True
        self._stream.flush()
        return len(text)


class Progress:
    """The CLI's own progress over a known number of items, following the one rule
    (a tqdm bar on a terminal; on a pipe, lines through :class:`PlainProgressStream`)."""

    def __init__(self, total: int, desc: str, unit: str = "item", enabled: bool = True):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr,
                             disable=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()


def _escaping_record_factory(previous):
    def make(*args, **kwargs):
        record = previous(*args, **kwargs)
        if record.name == "dinofeat" or record.name.startswith("dinofeat."):
            record.msg, record.args = safe(record.getMessage()), None
        return record
    make.dinofeat_escaping = True  # type: ignore[attr-defined]
    return make


def install_output() -> tuple[TextIO, TextIO]:
    """Route stdout through :class:`EscapingStream` and stderr through
    :class:`PlainProgressStream` when it is not a terminal (on a terminal, log records of
    the library are escaped instead); returns the original streams to restore."""
    old = sys.stdout, sys.stderr
    if sys.stdout is not None and not isinstance(sys.stdout, EscapingStream):
        sys.stdout = EscapingStream(sys.stdout)  # type: ignore[assignment]
    err = sys.stderr
    if err is not None and not isinstance(err, EscapingStream):
        tty = hasattr(err, "isatty") and err.isatty()
        if not tty:
            sys.stderr = PlainProgressStream(err)  # type: ignore[assignment]
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "dinofeat_escaping", False):
        logging.setLogRecordFactory(_escaping_record_factory(factory))
    return old
