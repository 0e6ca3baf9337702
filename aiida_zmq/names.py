"""Names that a peer chooses (client names, queue names, RPC identifiers): what they may contain, and how any text a
peer chose is printed.

A name reaches log lines and terminals. A newline in it forges a log line, an escape sequence clears the screen or
sets the window title of whoever runs ``aiida-zmq status``: the broker refuses such names where they arrive
(:func:`check_name`), and what is printed goes through :func:`printable`, so that a name stored before the check (or
a routing id, which a peer picks freely) cannot do either.
"""

from __future__ import annotations

import unicodedata

__all__ = ('MAX_NAME_BYTES', 'check_name', 'printable', 'printable_id')

#: The most bytes of UTF-8 a name may have (the client side refuses longer ones before sending).
MAX_NAME_BYTES = 255

# Control characters (C0, DEL, C1), format characters (bidirectional overrides, zero-width joiners), surrogates, and
# the line and paragraph separators: none belongs in a name, each can change how a line or a terminal looks.
_REFUSED_CATEGORIES = frozenset({'Cc', 'Cf', 'Cs', 'Co', 'Cn', 'Zl', 'Zp'})
_SHORT_ESCAPES = {'\n': '\\n', '\r': '\\r', '\t': '\\t'}


def _refused(character: str) -> bool:
    return unicodedata.category(character) in _REFUSED_CATEGORIES


def check_name(kind: str, raw: bytes) -> str:
    """The name ``raw`` decoded, or :class:`ValueError` saying what a ``kind`` (``queue name``, ...) must be."""
    if not raw:
        raise ValueError(f'a {kind} must not be empty')
    if len(raw) > MAX_NAME_BYTES:
        raise ValueError(f'a {kind} has at most {MAX_NAME_BYTES} bytes of UTF-8, got {len(raw)} bytes')
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError:
        raise ValueError(f'a {kind} must be UTF-8, got {printable(raw[:40].decode(errors="replace"))!s}') from None
    for character in text:
        if _refused(character):
            raise ValueError(
                f'a {kind} must not contain a control character, got {_escape(character)} in {printable(text[:80])}'
            )
    return text


def _escape(character: str) -> str:
    if character in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[character]
    code = ord(character)
    return f'\\x{code:02x}' if code < 0x100 else f'\\u{code:04x}' if code < 0x10000 else f'\\U{code:08x}'


def printable(text: str) -> str:
    """``text`` with every control, format and separator character escaped (``\\n``, ``\\x1b``, ``\\u202e``): safe
    for one log line or one line of a terminal."""
    if text.isprintable():
        return text
    return ''.join(_escape(character) if _refused(character) else character for character in text)


def printable_id(raw: bytes) -> str:
    """A routing id or other bytes a peer chose, for one log line."""
    return printable(bytes(raw).decode('utf-8', errors='replace'))
