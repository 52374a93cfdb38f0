"""Run many `python launch/X.py ARGS` cases from one interpreter: the heavy imports are paid once, then
each case runs in a forked child exactly as the launcher's __main__ (its own exit code and output).

python tests/workers/launch_many.py CASES.json RESULTS.json   (CASES: [[launcher path, [args...]], ...])
python tests/workers/launch_many.py --serve   (one JSON request a line on stdin: {"cases": [[launcher, [args...],
    cwd], ...], "jobs": N, "timeout": S}; one JSON line of results on stdout per request; EOF ends it)
"""
import json
import os
import runpy
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = str(Path(__file__).resolve().parent)
sys.path.insert(0, str(ROOT))

import megatron.core.dist_checkpointing  # noqa: E402,F401 - what a real (non --check) run imports lazily
import megatron.core.models.gpt  # noqa: E402,F401
import megatron.core.parallel_state  # noqa: E402,F401
import megatron.core.tensor_parallel  # noqa: E402,F401
import transformers  # noqa: E402,F401
import transformers.activations  # noqa: E402,F401 - the lazy modules that loading a config/tokenizer pulls in
import transformers.models.auto.modeling_auto  # noqa: E402,F401
import transformers.tokenization_utils_sentencepiece  # noqa: E402,F401
import transformers.tokenization_utils_tokenizers  # noqa: E402,F401

import megaslim.commands.compress  # noqa: E402,F401 - imports every command module
import megaslim.commands.evaluate  # noqa: E402,F401
import megaslim.commands.export_hf  # noqa: E402,F401
import megaslim.commands.generate  # noqa: E402,F401
import megaslim.commands.import_ckpt  # noqa: E402,F401
import megaslim.commands.preprocess_data  # noqa: E402,F401
import megaslim.commands.teacher_logits  # noqa: E402,F401


def _child(launcher: str, args: list, cwd: str | None, out: Path, err: Path) -> None:
    """In the forked child: stdout/stderr to files, then the launcher as a script; never returns."""
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    code = 0
    try:
        if cwd:
            os.chdir(cwd)
        sys.argv = [launcher, *args]
        # as `python launch/X.py`: the launcher's folder instead of this one on sys.path
        sys.path[:] = [str(Path(launcher).resolve().parent) if p == HERE else p for p in sys.path]
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


def run_cases(cases: list, scratch: Path, jobs: int = 1, timeout: float = 900) -> list:
    """Each case [launcher, args(, cwd)] in its own forked child, at most `jobs` at once; results in order.
    A child still running after `timeout` s is killed (returncode -9, timed_out true)."""
    results: list = [None] * len(cases)
    running: dict = {}  # pid -> (index, start)
    todo = list(enumerate(cases))

    def finish(pid: int, status: int) -> None:
        i, _ = running.pop(pid)
        out, err = scratch / f"{i}.out", scratch / f"{i}.err"
        results[i] = {"returncode": os.waitstatus_to_exitcode(status), "stdout": out.read_text(errors="replace"),
                      "stderr": err.read_text(errors="replace"), "timed_out": results[i] == "killed"}

    while todo or running:
        while todo and len(running) < max(1, jobs):
            i, (launcher, args, *rest) = todo.pop(0)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(launcher, args, rest[0] if rest else None, scratch / f"{i}.out", scratch / f"{i}.err")
            running[pid] = (i, time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            finish(pid, status)
            continue
        for pid, (i, start) in list(running.items()):
            if time.monotonic() - start > timeout and results[i] is None:
                results[i] = "killed"
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
    return results


def serve() -> None:
    """Answer requests on stdin until EOF; replies go to the original stdout, stray prints to stderr."""
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        req = json.loads(line)
        with tempfile.TemporaryDirectory() as d:
            res = run_cases(req["cases"], Path(d), req.get("jobs", 1), req.get("timeout", 900))
        reply.write(json.dumps(res) + "\n")
        reply.flush()


def main() -> None:
    if sys.argv[1:] == ["--serve"]:
        serve()
        return
    cases = json.loads(Path(sys.argv[1]).read_text())
    with tempfile.TemporaryDirectory() as d:
        results = run_cases(cases, Path(d))
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
