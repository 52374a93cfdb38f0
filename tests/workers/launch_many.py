"""Run many `python launch/X.py ARGS` cases from one interpreter: the heavy imports are paid once, then
each case runs in a forked child exactly as the launcher's __main__ (its own exit code and output).

python tests/workers/launch_many.py CASES.json RESULTS.json   (CASES: [[launcher path, [args...]], ...])
"""
import json
import os
import runpy
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import transformers  # noqa: E402,F401

import megaslim.commands.compress  # noqa: E402,F401 - imports every command module
import megaslim.commands.evaluate  # noqa: E402,F401
import megaslim.commands.export_hf  # noqa: E402,F401
import megaslim.commands.generate  # noqa: E402,F401
import megaslim.commands.import_ckpt  # noqa: E402,F401
import megaslim.commands.preprocess_data  # noqa: E402,F401
import megaslim.commands.teacher_logits  # noqa: E402,F401


def run_case(launcher: str, args: list, scratch: Path) -> dict:
    out, err = scratch / "out", scratch / "err"
    pid = os.fork()
    if pid == 0:  # the child: stdout/stderr to files, then the launcher as a script
        for fd, path in ((1, out), (2, err)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(f, fd)
        sys.argv = [launcher, *args]
        code = 0
        try:
            runpy.run_path(launcher, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - an uncaught error is a traceback with exit 1, as python does
            import traceback

            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return {"returncode": os.waitstatus_to_exitcode(status), "stdout": out.read_text(errors="replace"),
            "stderr": err.read_text(errors="replace")}


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    with tempfile.TemporaryDirectory() as d:
        results = [run_case(launcher, args, Path(d)) for launcher, args in cases]
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
