"""What the demo, the tests and the benchmark ask an AiiDA profile's database: it, not the broker, says what ran."""

from __future__ import annotations

from collections.abc import Iterable

TERMINAL_STATES = ('finished', 'excepted', 'killed')


def terminated(pks: Iterable[int]) -> set[int]:
    """The processes among ``pks`` that have terminated (finished, excepted or killed), as AiiDA stored it."""
    from aiida import orm

    query = orm.QueryBuilder().append(
        orm.ProcessNode,
        filters={'id': {'in': list(pks)}, 'attributes.process_state': {'in': list(TERMINAL_STATES)}},
        project='id',
    )
    return set(query.all(flat=True))
