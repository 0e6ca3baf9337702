"""Which process a stored task is for, read from the task's payload by pattern, never decoded.

AiiDA's tasks are plumpy's: ``{'task': 'continue', 'args': {'pid': PK, 'nowait': ..., 'tag': ...}}`` (plumpy's
``create_continue_body``, keys in that order), encoded by the sender's codec: tagged JSON (this project's hybrid codec,
compact separators) or YAML (AiiDA's own, as with RabbitMQ: keys sorted, indented by two). The broker never decodes a
payload (no codec, no loader that could build objects from tags), and listings (``aiida-zmq tasks list``,
``explain``) need only the pk: so it is matched in the first bytes of the payload, for both layouts. No AiiDA import:
the broker's listings use this.
"""

from __future__ import annotations

import re

__all__ = ('process_pk',)

_HEAD = 4096  # a continue body is about 70 bytes: never search a large payload whole
_JSON_CONTINUE = re.compile(rb'\x00J\{"task":"continue","args":\{"pid":(\d{1,19})[,}]')
_YAML_PID = re.compile(rb'^  pid: (\d{1,19})$', re.MULTILINE)
_YAML_CONTINUE = re.compile(rb'^task: continue$', re.MULTILINE)
_MAX_PK = 2**63 - 1


def process_pk(payload: bytes) -> int | None:
    """The pk of the process a ``continue`` task is for, ``None`` for any other payload."""
    head = payload[:_HEAD]
    match = _JSON_CONTINUE.match(head)
    if match is None and _YAML_CONTINUE.search(head) is not None:
        match = _YAML_PID.search(head)
    if match is None:
        return None
    pk = int(match.group(1))
    return pk if 0 < pk <= _MAX_PK else None
