"""The shape of the code, read from its source (``ast``): what issue 19 asks of every module, checked on each run.

- no module reads another object's private attributes (``x._y`` where ``x`` is not ``self`` or ``cls``), nor imports
  another module's private names (``from m import _y``);
- no import cycle within ``aiida_zmq`` (imports inside functions and under ``TYPE_CHECKING`` count: they hide a
  cycle, they do not remove it), and every relative import names a module that exists (mypy, with
  ``ignore_missing_imports``, does not see a ``from .aiida.x import`` that resolves below the wrong package);
- no class over 400 lines, no function over 60;
- every exception class in ``aiida_zmq/exceptions.py``.

The ``ALLOWED_*`` tables list what stood when this test was written: they may only shrink. A new violation fails
with where it is; an allowance that is no longer needed is harmless, and is removed when someone tidies the table.
"""

from __future__ import annotations

import ast
import builtins
import collections
import typing as t
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Source directory -> the package it is installed as (pyproject.toml's package-dir).
PACKAGES = {'aiida_zmq': 'aiida_zmq', 'circus_plugins': 'aiida_zmq.circus_plugins'}
MAX_CLASS_LINES = 400
MAX_FUNCTION_LINES = 60
# Underscore names that are public API: namedtuple's methods and Python's own dunders.
PUBLIC_UNDERSCORE = frozenset({'_replace', '_asdict', '_fields', '_make', '_field_defaults'})
OWN = frozenset({'self', 'cls'})

#: ``(file, expression)`` -> how many times the file may read that private attribute of another object.
ALLOWED_PRIVATE_READS: dict[tuple[str, str], int] = {}

#: Sets of modules allowed to import each other in a circle (a cycle found must lie within one of them).
ALLOWED_CYCLES: list[frozenset[str]] = [
    frozenset(['aiida_zmq.pytest_aiida_broker', 'aiida_zmq.testing']),
]

#: ``(file, qualified name)`` of the classes over MAX_CLASS_LINES and functions over MAX_FUNCTION_LINES.
ALLOWED_LONG: frozenset[tuple[str, str]] = frozenset(
    {
        ('aiida_zmq/aiida/broker.py', 'ZmqBroker'),
    }
)


class Module(t.NamedTuple):
    name: str  # dotted, as installed: aiida_zmq.circus_plugins.health
    path: str  # relative to the checkout, for messages
    is_package: bool
    tree: ast.Module


def _modules() -> dict[str, Module]:
    modules = {}
    for directory, package in PACKAGES.items():
        for file in sorted((ROOT / directory).rglob('*.py')):
            parts = list(file.relative_to(ROOT / directory).with_suffix('').parts)
            is_package = parts[-1] == '__init__'
            if is_package:
                parts.pop()
            name = '.'.join([package, *parts])
            tree = ast.parse(file.read_text(), str(file))
            modules[name] = Module(name, str(file.relative_to(ROOT)), is_package, tree)
    return modules


MODULES = _modules()


def private_reads(module: Module) -> collections.Counter[str]:
    """``x._y`` read where ``x`` is not ``self``/``cls``, as its source text; also ``from m import _y``."""
    found: collections.Counter[str] = collections.Counter()
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in OWN) and not _is_super(node.value):
                found[ast.unparse(node)] += 1
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            for alias in node.names:
                if _is_private(alias.name):
                    found[f'from {"." * node.level}{node.module} import {alias.name}'] += 1
    return found


def _is_private(name: str) -> bool:
    return name.startswith('_') and not name.endswith('__') and name not in PUBLIC_UNDERSCORE


def _is_super(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'super'


def _base(module: Module, level: int) -> str:
    parts = module.name.split('.')
    drop = level - 1 if module.is_package else level
    return '.'.join(parts[: len(parts) - drop])


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    """The absolute name of what ``node`` imports from."""
    if node.level == 0:
        return node.module or ''
    base = _base(module, node.level)
    return f'{base}.{node.module}' if node.module else base


def imports(module: Module) -> tuple[set[str], list[str]]:
    """The modules of ``aiida_zmq`` this one imports (anywhere in it), and the relative imports that resolve nowhere."""
    found: set[str] = set()
    broken: list[str] = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            if not source.startswith('aiida_zmq'):
                continue
            if source not in MODULES:
                broken.append(f'{module.path}:{node.lineno}: {source} is no module')
                continue
            submodules = {f'{source}.{alias.name}' for alias in node.names} & MODULES.keys()
            # ``from . import x`` imports the submodule x; ``from .m import y`` the module m.
            found.update(submodules or {source})
            if len(submodules) < len(node.names):
                found.add(source)
    found.discard(module.name)
    return found, broken


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def long_definitions(module: Module) -> dict[str, int]:
    """Qualified name -> lines, of the classes and functions over their limit."""
    found: dict[str, int] = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f'{prefix}{child.name}'
                lines = (child.end_lineno or child.lineno) - child.lineno + 1
                limit = MAX_CLASS_LINES if isinstance(child, ast.ClassDef) else MAX_FUNCTION_LINES
                if lines > limit:
                    found[name] = lines
                walk(child, f'{name}.')
            else:
                walk(child, prefix)

    walk(module.tree, '')
    return found


def test_no_reads_of_private_attributes_of_other_objects() -> None:
    new = []
    for module in MODULES.values():
        for expression, count in sorted(private_reads(module).items()):
            allowed = ALLOWED_PRIVATE_READS.get((module.path, expression), 0)
            if count > allowed:
                new.append(f'{module.path}: {expression} ({count} time(s), allowed {allowed})')
    assert not new, "reads of another object's private attributes; give that object a public method:\n" + '\n'.join(new)


def test_no_import_cycles_and_no_broken_relative_imports() -> None:
    graph: dict[str, set[str]] = {}
    broken: list[str] = []
    for module in MODULES.values():
        graph[module.name], unresolved = imports(module)
        broken.extend(unresolved)
    assert not broken, 'relative imports that name no module:\n' + '\n'.join(broken)
    new = [cycle for cycle in _cycles(graph) if not any(cycle <= allowed for allowed in ALLOWED_CYCLES)]
    assert not new, 'import cycles (a lower module imports a higher one back):\n' + '\n'.join(
        ' <-> '.join(sorted(cycle)) for cycle in new
    )


def test_no_class_or_function_too_long() -> None:
    new = [
        f'{module.path}: {name} has {lines} lines'
        for module in MODULES.values()
        for name, lines in sorted(long_definitions(module).items())
        if (module.path, name) not in ALLOWED_LONG
    ]
    assert not new, (
        f'classes over {MAX_CLASS_LINES} lines or functions over {MAX_FUNCTION_LINES}; split them by concern:\n'
        + '\n'.join(new)
    )


def exception_classes(module: Module) -> list[str]:
    """Classes that derive from an exception: a builtin one, one of ``aiida_zmq.exceptions``, or kiwipy's or click's
    (by name: ``...Error``, ``...Exception``, ``...Failed``)."""
    known = {node.name for node in ast.walk(MODULES['aiida_zmq.exceptions'].tree) if isinstance(node, ast.ClassDef)}
    found = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.ClassDef):
            bases = [ast.unparse(base).rpartition('.')[2] for base in node.bases]
            if any(_is_exception(base) or base in known for base in bases):
                found.append(node.name)
    return found


def _is_exception(name: str) -> bool:
    builtin = getattr(builtins, name, None)
    if isinstance(builtin, type) and issubclass(builtin, BaseException):
        return True
    return name.endswith(('Error', 'Exception', 'Failed'))


def test_every_exception_is_in_exceptions_py() -> None:
    elsewhere = [
        f'{module.path}: {name}'
        for module in MODULES.values()
        if module.name != 'aiida_zmq.exceptions'
        for name in exception_classes(module)
    ]
    assert not elsewhere, 'exceptions outside aiida_zmq/exceptions.py (define them there):\n' + '\n'.join(elsewhere)


def test_the_checks_see_what_they_look_for() -> None:
    """Each check finds the violation it exists for, in a module written for it (a check that finds nothing is void)."""
    source = (
        'from __future__ import annotations\n'
        'from aiida_zmq.structure_probe import other\n'
        'class Probe:\n'
        '    def run(self, other):\n'
        '        self._mine = super()._theirs\n'
        '        return other._state, self._mine._inner\n'
        'class Refused(RuntimeError):\n'
        '    pass\n'
        'def long():\n' + '    x = 1\n' * MAX_FUNCTION_LINES
    )
    probe = Module('aiida_zmq.structure_probe', 'probe.py', False, ast.parse(source))
    assert private_reads(probe) == {'other._state': 1, 'self._mine._inner': 1}
    assert long_definitions(probe) == {'long': MAX_FUNCTION_LINES + 1}
    assert exception_classes(probe) == ['Refused']
    assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [frozenset('abc')]
