"""Which process a stored task is for: read from the payload as AiiDA's two codecs write it, never executed."""

from __future__ import annotations

import json

import pytest
import yaml

from aiida_zmq.codec import JSON_TAG, default_codec
from aiida_zmq.task_payload import process_pk


def _continue(pk: object) -> dict:
    return {'task': 'continue', 'args': {'pid': pk, 'nowait': False, 'tag': None}}


@pytest.mark.parametrize('encode', [default_codec().encode, lambda value: yaml.dump(value, encoding='utf-8')])
def test_continue_task_gives_its_pk(encode) -> None:
    assert process_pk(encode(_continue(42))) == 42


@pytest.mark.parametrize(
    'payload',
    [
        JSON_TAG + json.dumps({'task': 'launch', 'args': {'pid': 3}}).encode(),
        JSON_TAG + json.dumps(_continue('42')).encode(),
        JSON_TAG + json.dumps(_continue(True)).encode(),
        JSON_TAG + json.dumps(_continue(-1)).encode(),
        JSON_TAG + json.dumps(_continue(2**70)).encode(),
        JSON_TAG + b'{not json',
        JSON_TAG + json.dumps([1, 2]).encode(),
        yaml.dump({'task': 'launch', 'args': {'pid': 3}}, encoding='utf-8'),
        b'!!python/object/apply:os.system ["echo no"]\n',
        b'',
    ],
)
def test_anything_else_gives_none(payload: bytes) -> None:
    assert process_pk(payload) is None
