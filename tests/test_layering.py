"""The layering rules of issue 17 that import-linter cannot see.

* Every destroy/revoke guard registered anywhere under ``kms_pipelines/`` (``@lifecycle.destroy_guard``
  / ``@lifecycle.revoke_guard``) is in the registry once the CLI or the Dagster definitions load
  (``core/runtime/guards.py`` imports the modules that register them).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kms_pipelines"


def _declared_guards(kind: str) -> set[str]:
    """The names passed to ``@….<kind>("name")`` in the source, found by parsing it."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for dec in node.decorator_list:
                    if (
                        isinstance(dec, ast.Call)
                        and isinstance(dec.func, ast.Attribute)
                        and dec.func.attr == kind
                        and dec.args
                        and isinstance(dec.args[0], ast.Constant)
                    ):
                        names.add(dec.args[0].value)
    return names


_PROBE = """
import json, sys
{load}
from kms_pipelines.core.keys import lifecycle
print(json.dumps({{"destroy": sorted(lifecycle.destroy_guards()), "revoke": sorted(lifecycle._REVOKE_GUARDS)}}))
"""

ENTRY_POINTS = {
    # the CLI builds every context through runtime.wiring.context_from_env (cli.py, _context)
    "cli": "import kms_pipelines.cli\nfrom kms_pipelines.core.runtime.wiring import context_from_env",
    "dagster": "import kms_pipelines.definitions as d\nd.defs()",
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_guard_is_registered_when_an_entry_point_loads(entry):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(load=ENTRY_POINTS[entry])],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
    ).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    declared_destroy = _declared_guards("destroy_guard")
    declared_revoke = _declared_guards("revoke_guard")
    assert declared_destroy >= {"retention", "deks", "restore_points", "escrow", "archive_copies"}
    assert set(loaded["destroy"]) == declared_destroy, "a destroy guard's module is missing from runtime/guards.py"
    assert set(loaded["revoke"]) == declared_revoke, "a revoke guard's module is missing from runtime/guards.py"


def test_a_destroy_decision_before_the_guards_load_refuses():
    code = (
        "from kms_pipelines.core.keys import lifecycle\n"
        "try:\n    lifecycle.destroy_guards()\nexcept lifecycle.LifecycleError as e:\n    print('refused:', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        check=True,
    ).stdout
    assert "refused: destroy/revoke guards are not loaded" in out


# ---- no import inside a function in core/, unless it is lazy for start-up time ---------------
# Issue 17: "No import inside a function to dodge a cycle; lazy imports for start-up time are
# fine when the comment says so." A function-level import under core/ must carry this marker
# on its line (or the line above); everything else goes to the top of the module.
LAZY_MARKER = "lazy import: start-up time"


def _function_level_imports(path: Path) -> list[tuple[int, str]]:
    source = path.read_text()
    lines = source.splitlines()
    found = []
    for fn in ast.walk(ast.parse(source, str(path))):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    near = "\n".join(lines[max(node.lineno - 2, 0) : node.end_lineno])
                    if LAZY_MARKER not in near:
                        found.append((node.lineno, ast.unparse(node)))
    return sorted(set(found))


def test_core_has_no_function_level_import_without_a_start_up_reason():
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {text}"
        for path in sorted((PACKAGE / "core").rglob("*.py"))
        for line, text in _function_level_imports(path)
    ]
    assert not offenders, (
        f"imports inside functions in core/ without a '# {LAZY_MARKER} (…)' comment "
        "(hoist them, or break the cycle they dodge):\n" + "\n".join(offenders)
    )


def test_the_import_check_sees_a_function_level_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f():\n    from . import x\n\n\ndef g():\n    import boto3  # lazy import: start-up time (boto3)\n"
    )
    assert _function_level_imports(bad) == [(2, "from . import x")]
