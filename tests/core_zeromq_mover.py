"""Move tasks from or to core.zeromq and die by SIGKILL right after a chosen step: a crash at a point the test names.

    python core_zeromq_mover.py in|out SERVICE_DIR DATA_DIR QUEUE [EVENT COUNT [BATCH]]

``EVENT`` is one of the steps :mod:`aiida_zmq.core_zeromq_move` reports (``copied``, ``retired``, ``moved``,
``written``, ``withdrawn``); the process kills itself at its ``COUNT``-th occurrence. Without an event it just moves,
and prints the report as JSON. No AiiDA here: the codec is aiida-zmq's default, which reads what AiiDA's hybrid codec
writes.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from aiida_zmq.codec import default_codec
from aiida_zmq.core_zeromq import CoreZeromqDir
from aiida_zmq.core_zeromq_move import export_to_core_zeromq, import_from_core_zeromq


def main(argv: list[str]) -> int:
    direction, service_dir, data_dir, queue = argv[:4]
    kill_at = argv[4] if len(argv) > 4 else None
    count = int(argv[5]) if len(argv) > 5 else 1
    batch = int(argv[6]) if len(argv) > 6 else 500
    seen = 0

    def on_event(event: str, zeromq_id: str) -> None:
        nonlocal seen
        if event == kill_at:
            seen += 1
            if seen == count:
                os.kill(os.getpid(), signal.SIGKILL)

    codec = default_codec()
    source = CoreZeromqDir(service_dir)
    if direction == 'in':
        report = import_from_core_zeromq(source, data_dir, queue, codec.encode, batch_size=batch, on_event=on_event)
    else:
        report = export_to_core_zeromq(data_dir, source, queue, codec.decode, batch_size=batch, on_event=on_event)
    print(json.dumps(report.as_dict()))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
