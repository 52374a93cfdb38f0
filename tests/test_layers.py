"""The structure checks CI runs: import-linter's layers contract, scripts/check_layers.py on the repo (no
module-level import cycle in megaslim, no function over 80 lines in megaslim/ and bench/), and the
checker itself on a small planted package."""
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "scripts" / "check_layers.py"


def _run(*cmd, cwd=ROOT):
    return subprocess.run([*map(str, cmd)], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_import_layers_contract_holds():
    res = _run(Path(sys.executable).parent / "lint-imports")
    assert res.returncode == 0, res.stdout + res.stderr


def test_no_import_cycle_and_no_long_function():
    res = _run(sys.executable, CHECK)
    assert res.returncode == 0, res.stdout + res.stderr


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_check_layers_finds_planted_cycle_and_long_function(tmp_path):
    def body(indent, n):
        return "".join(f"{indent}x{i} = {i}\n" for i in range(n))

    _write(tmp_path / "pkg", {
        "__init__.py": "",
        "a.py": "from pkg.b import f\n",
        "b.py": "from . import c\n\ndef f():\n    return 1\n",
        "c.py": "try:\n    import pkg.a\nexcept ImportError:\n    pass\n",
        # not cycles: a TYPE_CHECKING import, a function-level import, an external import
        "d.py": "from typing import TYPE_CHECKING\nimport os\nif TYPE_CHECKING:\n    from pkg import e\n",
        "e.py": "def g():\n    from pkg import d\n    return d\n",
        "sub/__init__.py": "from .x import y\n",
        "sub/x.py": "from ..sub import w\ny = 1\n",  # sub -> sub.x -> sub (relative, two levels up)
        "sub/z.py": "from ..sub import x\n",  # an edge to the module pkg.sub.x, not to pkg.sub: no cycle
        # 80 lines from the def (the decorator does not count), then a method of 81 lines
        "long.py": "@staticmethod\ndef ok():\n" + body("    ", 79)
                   + "\n\nclass K:\n    def too_long(self):\n" + body("        ", 79) + "        return 0\n",
    })
    res = _run(sys.executable, CHECK, "--package", tmp_path / "pkg", "--lengths", tmp_path / "pkg", cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    out = res.stdout.splitlines()
    cycles = [ln for ln in out if ln.startswith("import cycle: ")]
    assert cycles == ["import cycle: pkg.a -> pkg.b -> pkg.c -> pkg.a", "import cycle: pkg.sub -> pkg.sub.x -> pkg.sub"]
    longs = [ln for ln in out if "lines (limit 80)" in ln]
    assert longs == ["pkg/long.py:85: K.too_long is 81 lines (limit 80)"], out
    assert "2 import cycle(s), 1 function(s) over 80 lines" in res.stderr


def test_check_layers_passes_a_clean_package(tmp_path):
    _write(tmp_path / "pkg", {"__init__.py": "from pkg import a\n", "a.py": "import os\nfrom pkg import b\n",
                              "b.py": "def f():\n    from pkg import a\n    return a\n"})
    res = _run(sys.executable, CHECK, "--package", tmp_path / "pkg", "--lengths", tmp_path / "pkg", "--max-lines", 3,
               cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no import cycle in pkg" in res.stdout
