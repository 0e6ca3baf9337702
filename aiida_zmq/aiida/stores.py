"""The broker stores of an AiiDA configuration: which profile each belongs to, and removing those left behind.

``verdi profile delete`` removes a profile's storage but knows nothing of its broker: aiida-core 2.9 gives a broker
plugin no hook on deletion. The store of a deleted profile (``<config>/broker/zmq/<uuid>/``: its tasks, identity and
health files) stays behind. This module finds such stores and removes them, never one that a profile of the
configuration still uses (by its uuid, or through a ``data_dir`` override) nor one a broker holds.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from ..discovery import lock_held
from ..exceptions import StoreInUse

__all__ = ('BrokerStore', 'StoreInUse', 'broker_stores', 'remove_store', 'stores_root')


@dataclasses.dataclass(frozen=True)
class BrokerStore:
    """A broker data directory of the configuration and the profiles that use it (none: left by a deleted one)."""

    path: Path
    profiles: tuple[str, ...]

    @property
    def orphaned(self) -> bool:
        return not self.profiles


def stores_root() -> Path:
    """Where the broker keeps a profile's data directory unless the profile overrides it."""
    from aiida.manage.configuration import get_config

    return Path(get_config().dirpath) / 'broker' / 'zmq'


def _users() -> dict[Path, list[str]]:
    """Each data directory a profile of the configuration uses, whatever its broker now (a switched profile's store
    may still hold tasks that ``aiida-zmq migrate`` moves)."""
    from aiida.manage.configuration import get_config

    from .broker import broker_data_dir

    users: dict[Path, list[str]] = {}
    for profile in get_config().profiles:
        users.setdefault(broker_data_dir(profile).resolve(), []).append(profile.name)
        users.setdefault((stores_root() / str(profile.uuid)).resolve(), []).append(profile.name)
    return users


def broker_stores() -> list[BrokerStore]:
    """Every directory under :func:`stores_root`, and every profile's own data directory that exists, sorted."""
    users = _users()
    root = stores_root()
    paths = {path.resolve() for path in root.iterdir() if path.is_dir()} if root.is_dir() else set()
    paths |= {path for path in users if path.is_dir()}
    return [BrokerStore(path, tuple(sorted(set(users.get(path, []))))) for path in sorted(paths)]


def remove_store(store: BrokerStore) -> None:
    """Remove an orphaned store; :class:`StoreInUse` for one a profile uses or a broker (or an offline submit) holds."""
    if not store.orphaned:
        raise StoreInUse(f'{store.path} is the broker store of profile(s) {", ".join(store.profiles)}')
    if lock_held(store.path):
        raise StoreInUse(f'a broker holds {store.path}: stop it first (its pid is in {store.path / "broker.json"})')
    shutil.rmtree(store.path)
