"""Handler of ADMIN: the request is parsed and run by ``admin.py``; the answer waits for the batch's commit when
the operation changed the store."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from ...exceptions import AdminRequestError, StoreError
from ...protocol import Command
from .. import admin as operations
from ..context import Context
from ..peers import Client


def admin(broker: Context, client: Client, args: Sequence[bytes]) -> None:
    correlation, request_bytes = args
    try:
        op, operation, arguments = operations.parse(request_bytes)
    except AdminRequestError as exception:
        error(broker, client, correlation, str(exception))
        return
    try:
        response = operations.run(broker, operation, arguments)
    except StoreError as exception:  # it needed the store and the store failed: nothing was changed
        broker.limited_log.error('ADMIN %s: %s', op, exception, key=('store',))
        error(broker, client, correlation, f'{op} needs the task store, which fails: {exception}')
        return
    except Exception:
        # A bug, not bad input (the arguments were checked): the caller still gets an answer, not a timeout.
        broker.limited_log.log(
            logging.ERROR, 'ADMIN %s from %s failed', op, client.name, key=('admin-failed', op), exc_info=True
        )
        error(broker, client, correlation, f'{op} failed inside the broker: see its log')
        return
    if operation.changes_store:
        # Answered after the batch's commit, like task confirms (or with the store's fault, if it fails).
        broker.batch.reply_after_commit(client, correlation, json.dumps(response).encode())
    else:
        broker.send(client, Command.ADMIN_REPLY, correlation, b'ok', json.dumps(response).encode())


def error(broker: Context, client: Client, correlation: bytes, text: str) -> None:
    broker.send(client, Command.ADMIN_REPLY, correlation, b'error', json.dumps(text).encode())
