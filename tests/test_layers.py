"""Imports run one way, top to bottom (the README's tour states the layers):

    search_spaces/  ->  study/  ->  analysis/, bench/  ->  trainables/  ->  zoo/, tracking/

A module may import its own package and any package below its layer; never one above,
nor a sibling of its own layer (analysis and bench, zoo and tracking stay apart). The
walk reads every import statement with `ast`, the ones inside functions too.
"""

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
LAYERS = [("search_spaces",), ("study",), ("analysis", "bench"), ("trainables",), ("zoo", "tracking")]
LAYER = {package: depth for depth, packages in enumerate(LAYERS) for package in packages}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import of one of our packages in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in LAYER]
    return found


def upward_imports(root: Path = REPO) -> list[str]:
    bad = []
    for package, depth in LAYER.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, target in imported_packages(path):
                if target != package and LAYER[target] <= depth:
                    bad.append(f"{path.relative_to(root)}:{line} imports {target} "
                               f"({'a sibling' if LAYER[target] == depth else 'a layer above'})")
    return bad


def test_no_import_runs_up():
    assert upward_imports() == []


def test_the_walk_finds_an_upward_import(tmp_path):
    """The check itself can fail: an import of study/ from trainables/ (inside a function) is found."""
    for package in LAYER:
        (tmp_path / package).mkdir()
    (tmp_path / "trainables" / "bad.py").write_text("def f():\n    from study.space import choice\n")
    (tmp_path / "zoo" / "ok.py").write_text("import os\nimport zoo.cache\n")
    (tmp_path / "analysis" / "sibling.py").write_text("import bench.memory\n")
    assert upward_imports(tmp_path) == ["analysis/sibling.py:1 imports bench (a sibling)",
                                        "trainables/bad.py:2 imports study (a layer above)"]


@pytest.mark.parametrize("module, absent", [
    ("analysis.frontier", ("ray", "torch", "deepspeed")),   # reading a study needs neither Ray nor torch
    ("tracking.trial_log", ("ray", "torch")),
    ("zoo", ("torch", "transformers")),
])
def test_light_packages_stay_light(module, absent):
    import subprocess

    code = f"import sys, {module}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importing {module} pulled in {out.stdout.strip()}"
