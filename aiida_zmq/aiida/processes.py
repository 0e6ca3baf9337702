"""What AiiDA's storage says about processes, for ``aiida-zmq tasks list`` and ``aiida-zmq explain``.

Read-only, and only through AiiDA's ORM: a process's state, whether it is paused (its node's attribute, and what its
checkpoint says: aiida-core saves no checkpoint on play, #6569, so a restart reloads such a process paused), when it
last changed, whether it is sealed, and its caller and callees.
"""

from __future__ import annotations

import dataclasses
import re
import typing as t
from collections.abc import Iterable

__all__ = ('ProcessView', 'load_storage', 'process_states', 'process_views')

# plumpy's checkpoint (YAML) keeps a paused process's pause future under ``_paused``; a running one has none there.
_CHECKPOINT_PAUSED = re.compile(r'^\s*_paused: (?!null\s*$)', re.MULTILINE)


@dataclasses.dataclass
class ProcessView:
    """One process as AiiDA's storage has it (JSON-able with :func:`dataclasses.asdict`)."""

    pk: int
    label: str
    state: str | None  # created, waiting, running, finished, excepted, killed; None when it never got one
    exit_status: int | None
    paused: bool
    checkpoint_paused: bool
    sealed: bool
    last_change: float  # the node's mtime, seconds since the epoch
    caller: int | None
    callees: list[int]

    @property
    def terminated(self) -> bool:
        return self.state in ('finished', 'excepted', 'killed')

    def describe_state(self) -> str:
        """As ``verdi process list`` shows it: ``Waiting``, ``Finished [0]``, ``Running (paused)``."""
        text = (self.state or 'no state').capitalize()
        if self.state == 'finished' and self.exit_status is not None:
            text += f' [{self.exit_status}]'
        return text + (' (paused)' if self.paused else '')


def load_storage(profile: t.Any) -> None:
    """Load the profile and its storage (raises what AiiDA raises when the storage cannot be read)."""
    from aiida import load_profile
    from aiida.manage import get_manager

    load_profile(profile.name, allow_switch=True)
    get_manager().get_profile_storage()


def process_states(pks: Iterable[int]) -> dict[int, str]:
    """``pk -> state as verdi shows it`` for the processes among ``pks`` that exist (the profile loaded)."""
    return {pk: view.describe_state() for pk, view in process_views(pks).items()}


def process_views(pks: Iterable[int]) -> dict[int, ProcessView]:
    """The processes among ``pks`` that exist in the loaded profile's storage."""
    from aiida import orm
    from aiida.common.links import LinkType

    wanted = sorted(set(pks))
    if not wanted:
        return {}
    keys = ('process_state', 'exit_status', 'paused', 'sealed', 'checkpoints', 'process_label')
    query = orm.QueryBuilder().append(
        orm.ProcessNode,
        filters={'id': {'in': wanted}},
        project=['id', 'mtime', 'label', *(f'attributes.{key}' for key in keys)],
    )
    views = {}
    for pk, mtime, label, state, exit_status, paused, sealed, checkpoint, process_label in query.iterall():
        views[pk] = ProcessView(
            pk=pk,
            label=process_label or label or '',
            state=state,
            exit_status=exit_status,
            paused=bool(paused),
            checkpoint_paused=bool(checkpoint and _CHECKPOINT_PAUSED.search(checkpoint)),
            sealed=bool(sealed),
            last_change=mtime.timestamp(),
            caller=None,
            callees=[],
        )
    if views:
        links = orm.QueryBuilder().append(orm.ProcessNode, filters={'id': {'in': list(views)}}, tag='p', project='id')
        links.append(
            orm.ProcessNode,
            with_incoming='p',
            edge_filters={'type': {'in': [LinkType.CALL_CALC.value, LinkType.CALL_WORK.value]}},
            project='id',
        )
        for parent, child in links.iterall():
            views[parent].callees.append(child)
        callers = orm.QueryBuilder().append(orm.ProcessNode, filters={'id': {'in': list(views)}}, tag='c', project='id')
        callers.append(
            orm.ProcessNode,
            with_outgoing='c',
            edge_filters={'type': {'in': [LinkType.CALL_CALC.value, LinkType.CALL_WORK.value]}},
            project='id',
        )
        for child, parent in callers.iterall():
            views[child].caller = parent
    for view in views.values():
        view.callees.sort()
    return views
