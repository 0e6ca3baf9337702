"""The release artefacts: ``python -m build`` makes an sdist and a wheel that install and run (issue 22, release).

By default the sdist is built and its contents checked: the package, and the tests, docs and changelog. With
``--run-slow`` both are built (the wheel from the sdist, as ``build`` does: a file the sdist lacks breaks the wheel),
the wheel's contents checked (every package and data file), and each installed into a fresh virtual environment,
outside the checkout, to run ``aiida-zmq demo``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import aiida_zmq

ROOT = Path(__file__).resolve().parent.parent
VERSION = aiida_zmq.__version__  # from the metadata of this checkout's (editable) install: pyproject.toml's
# In the sdist besides the package: what `bash tests/run.sh` and the docs build need.
SDIST_HAS = (
    'config/circus.ini.tmpl',
    'circus_plugins/events.py',
    'tests/run.sh',
    'tests/conftest.py',
    'tests/aiida/conftest.py',
    'tests/upstream/run.py',
    'docs/index.md',
)
SDIST_HAS += ('mkdocs.yml', 'CHANGELOG.md', 'README.md', 'pyproject.toml')
WHEEL_HAS = ('aiida_zmq/__init__.py', 'aiida_zmq/circus_plugins/events.py', 'aiida_zmq/config/circus.ini.tmpl')


def _build(out: Path, *options: str) -> None:
    command = [sys.executable, '-m', 'build', *options, '--outdir', str(out), str(ROOT)]
    # Not from the checkout: `python -m` puts the working directory first on sys.path, and the checkout's own build/
    # (tests/run.sh builds LazyFS there) would be imported instead of the `build` package.
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, cwd=out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope='module')
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp('sdist')
    _build(out, '--sdist')
    return out / f'aiida_zmq-{VERSION}.tar.gz'


@pytest.fixture(scope='module')
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp('dist')
    _build(out)
    return {
        'sdist': out / f'aiida_zmq-{VERSION}.tar.gz',
        'wheel': out / f'aiida_zmq-{VERSION}-py3-none-any.whl',
    }


@pytest.mark.slow
def test_the_wheel_has_every_package_and_its_data(dist: dict[str, Path]) -> None:
    names = set(zipfile.ZipFile(dist['wheel']).namelist())
    assert set(WHEEL_HAS) <= names, sorted(set(WHEEL_HAS) - names)
    assert not [name for name in names if name.startswith(('tests/', 'circus_plugins/', 'config/'))]
    metadata = zipfile.ZipFile(dist['wheel']).read(f'aiida_zmq-{VERSION}.dist-info/METADATA').decode()
    assert f'Version: {VERSION}' in metadata


def test_the_sdist_carries_the_tests_and_docs(sdist: Path) -> None:
    prefix = f'aiida_zmq-{VERSION}/'
    with tarfile.open(sdist) as archive:
        names = {name.removeprefix(prefix) for name in archive.getnames()}
    assert set(SDIST_HAS) <= names, sorted(set(SDIST_HAS) - names)
    assert not [name for name in names if '__pycache__' in name or name.startswith(('.venv', 'build/'))]


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['wheel', 'sdist'])
def test_each_installs_in_a_fresh_venv_and_runs_the_demo(dist: dict[str, Path], kind: str, tmp_path: Path) -> None:
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / 'bin' / 'pip'), 'install', '--quiet', str(dist[kind])],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    env = {key: value for key, value in os.environ.items() if not key.startswith(('AIIDA_', 'VIRTUAL_ENV'))}
    version = subprocess.run(
        [str(venv / 'bin' / 'aiida-zmq'), '--version'], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert version.stdout.strip() == f'aiida-zmq, version {VERSION}', version.stdout + version.stderr
    # Run from outside the checkout, so that the installed package is what runs, not this source tree.
    demo = subprocess.run(
        [str(venv / 'bin' / 'aiida-zmq'), 'demo'],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
        check=False,
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
