"""Message codecs: JSON where a message is plain JSON, another codec (YAML by default) for everything else.

Each encoded message starts with a tag so that a decoder reads both: ``b'\\x00J'`` then JSON text for plain messages;
anything else goes to the fallback decoder untouched (a NUL byte cannot start a YAML document, so an untagged YAML
message from an older sender still decodes). Plain means: dicts with string keys, lists, strings, ints, finite
floats, booleans and None, so that decoding gives back exactly what was encoded (a tuple, for instance, would come
back as a list from JSON, and goes to the fallback instead).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from typing import Any

import yaml

__all__ = ('HybridCodec', 'default_codec', 'is_plain')

JSON_TAG = b'\x00J'

Encoder = Callable[[Any], 'bytes | str']
Decoder = Callable[['bytes | str'], Any]

_SCALARS = (str, bool, type(None))


def is_plain(value: Any, _depth: int = 0) -> bool:
    """Whether ``value`` survives a JSON round trip unchanged (types included)."""
    kind = type(value)
    if kind in _SCALARS or kind is int:
        return True
    if kind is float:
        return math.isfinite(value)
    if _depth > 64:
        return False
    if kind is dict:
        return all(type(key) is str and is_plain(item, _depth + 1) for key, item in value.items())
    if kind is list:
        return all(is_plain(item, _depth + 1) for item in value)
    return False


def _yaml_encode(value: Any) -> bytes:
    return yaml.dump(value, encoding='utf-8', Dumper=getattr(yaml, 'CDumper', yaml.Dumper))


def _yaml_decode(data: bytes | str) -> Any:
    return yaml.load(data, Loader=getattr(yaml, 'CFullLoader', yaml.FullLoader))


class HybridCodec:
    """Encode plain messages as tagged JSON and the rest with ``fallback_encoder``."""

    def __init__(self, fallback_encoder: Encoder = _yaml_encode, fallback_decoder: Decoder = _yaml_decode) -> None:
        self._fallback_encoder = fallback_encoder
        self._fallback_decoder = fallback_decoder
        self._json_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(',', ':'))
        self._json_decoder = json.JSONDecoder()

    def encode(self, value: Any) -> bytes:
        if is_plain(value):
            return JSON_TAG + self._json_encoder.encode(value).encode('utf-8')
        encoded = self._fallback_encoder(value)
        return encoded.encode('utf-8') if isinstance(encoded, str) else encoded

    def decode(self, data: bytes | str) -> Any:
        if isinstance(data, bytes | bytearray | memoryview) and bytes(data[:2]) == JSON_TAG:
            return self._json_decoder.decode(bytes(data[2:]).decode('utf-8'))
        return self._fallback_decoder(data)


@functools.cache
def default_codec() -> HybridCodec:
    """The codec communicators use unless given an encoder and decoder: JSON, with YAML as the fallback."""
    return HybridCodec()
