"""Watcher hooks run inside the arbiter (``circusd``): keep them cheap and never raising."""

from __future__ import annotations

import time
import typing as t


def extended_stats(watcher: t.Any, arbiter: t.Any, hook_name: str, pid: int, stats: dict[str, t.Any]) -> None:
    """Add the health plugin's last verdict to the broker's stats (``circusctl stats --extended <broker watcher>``).

    ``circusctl`` prints only a fixed set of fields of a process, among them ``cmdline``: the verdict is appended to
    it so it shows in the plain output, and the whole record is under ``health`` for ``circusctl --json``.
    """
    from .health import read_health

    try:
        health = read_health(watcher.working_dir or '.')
        if not health:
            return
        stats['health'] = health
        age = time.time() - float(health.get('checked_at', 0))
        stats['cmdline'] = (
            f'{stats.get("cmdline", "")} [health: {health.get("verdict")} {age:.0f}s ago, '
            f'latency {health.get("latency_ms")} ms, {health.get("failed_checks")} failed, '
            f'{health.get("actions")} action(s), last: {health.get("last_action")}]'
        )
    except Exception:  # a hook must never break the arbiter's stats command
        return
