"""Showing sandbox output to a human: bytes from an untrusted run are decoded leniently and
stripped of terminal control sequences (colour, cursor moves, title/OSC, bells) before printing."""

from __future__ import annotations

import re

# CSI (ESC [ ... final), OSC (ESC ] ... BEL or ST), other two-byte ESC sequences, 8-bit CSI.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]|\x9b[0-?]*[ -/]*[@-~]")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(data: bytes) -> str:
    """Text safe to write to a terminal or a chat message: invalid UTF-8 becomes U+FFFD."""
    text = data.decode("utf-8", errors="replace")
    text = _ESCAPES.sub("", text)
    return _CONTROLS.sub("", text)
