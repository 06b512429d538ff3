"""The server's log in tritonserver's shape, on Python's `logging`.

A Triton user reads (and greps, and ships to a collector) lines like

    I1205 01:55:50.552834 17686 model_lifecycle.cc:839] "successfully loaded 'good2'"

so Torpor writes the same: a severity letter, the time (UTC, as Triton), the process id, the
source file and line, and the message quoted so that one record is one line even when a model's
error spans several. `--log-format ISO8601` gives Triton's other shape. Tables (the model table
at start) are written as Triton writes them: the record's line, then the table itself unquoted.

The switches (`log_info`, `log_warning`, `log_error`, `log_verbose_level`, `log_format`) are read
from a callable on every record, so the logging extension (`POST /v2/logging`) changes a running
server's log without reinstalling anything.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence

Settings = Callable[[], dict]

# Exceptions whose text is written for the operator: their class name adds nothing. Any other
# kind (KeyError, TypeError, ...) is a bug somewhere, and its class is half of what it says.
_PLAIN = (RuntimeError, OSError, ValueError, MemoryError)


def _letter(levelno: int) -> str:
    # Triton marks verbose messages 'I' too: its verbose level is a filter, not a severity
    if levelno >= logging.ERROR:
        return "E"
    return "W" if levelno >= logging.WARNING else "I"


class TritonFormatter(logging.Formatter):
    """Formats records as tritonserver does under `--log-format default` or `ISO8601`."""

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        # a table is laid out for the eye; anything else is quoted so one record stays one line
        body = "\n" + text + "\n" if getattr(record, "table", False) else json.dumps(text, ensure_ascii=False)
        seconds = int(record.created)
        when = time.gmtime(seconds)
        letter = _letter(record.levelno)
        where = f"{record.process} {record.filename}:{record.lineno}]"
        if self.settings().get("log_format") == "ISO8601":
            return f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', when)} {letter} {where} {body}"
        micros = int((record.created - seconds) * 1_000_000)
        return f"{letter}{time.strftime('%m%d %H:%M:%S', when)}.{micros:06d} {where} {body}"


class SeverityGate(logging.Filter):
    """Triton's `--log-info`, `--log-warning`, `--log-error` and `--log-verbose` as switches on
    the one handler: a severity that is off is dropped whichever logger wrote it."""

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings

    def filter(self, record: logging.LogRecord) -> bool:
        s = self.settings()
        if record.levelno >= logging.ERROR:
            return bool(s.get("log_error", True))
        if record.levelno >= logging.WARNING:
            return bool(s.get("log_warning", True))
        if record.levelno >= logging.INFO:
            return bool(s.get("log_info", True))
        return s.get("log_verbose_level", 0) > 0


def install(settings: Settings, log_file: str = "") -> logging.Handler:
    """Send every log record (Torpor's and its libraries') through one handler in Triton's
    shape: to `log_file` when given, else to stderr as tritonserver does. OSError when the file
    cannot be opened."""
    handler: logging.Handler = logging.FileHandler(log_file, encoding="utf-8") if log_file else logging.StreamHandler()
    handler.setFormatter(TritonFormatter(settings))
    handler.addFilter(SeverityGate(settings))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    # libraries speak at WARNING and above; Torpor's own logger is set by its log settings
    root.setLevel(logging.WARNING)
    return handler


def model_table(rows: Sequence[tuple[str, str, str]]) -> str:
    """Triton's start-up table of `Model | Version | Status`; a cell spanning several lines
    (a model's multi-line error) continues on rows with the other cells blank, as Triton's."""
    header = ("Model", "Version", "Status")
    lines: list[tuple[str, ...]] = []
    for row in rows:
        cells = [str(c).split("\n") for c in row]
        depth = max(len(c) for c in cells)
        for i in range(depth):
            lines.append(tuple(c[i] if i < len(c) else "" for c in cells))
    widths = [max([len(header[k])] + [len(line[k]) for line in lines]) for k in range(3)]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def row_text(cells: Sequence[str]) -> str:
        return "|" + "|".join(f" {c.ljust(w)} " for c, w in zip(cells, widths, strict=True)) + "|"

    return "\n".join([rule, row_text(header), rule, *(row_text(line) for line in lines), rule])


def reason(e: BaseException) -> str:
    """What went wrong, in the words of whoever raised it: a TorporError's message, an
    operator-facing exception's text without its class name, else `Class: text`."""
    message = getattr(e, "message", None)
    if isinstance(message, str) and message:
        return message
    text = str(e)
    if isinstance(e, _PLAIN) and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def one_line(text: str) -> str:
    """A reason fit for the single line a refusal prints: its lines joined, blank ones dropped."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())
