import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("PYTHONWARNINGS", "ignore")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random HF Llama directory (4 layers, hidden 64, 8 heads / 4 groups, tied embeddings)."""
    from tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded default model as a cached HF directory (downloaded and converted once)."""
    from megaslim.sources import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def megatron_tp1():
    """torch.distributed (world 1) + megatron parallel state TP=1 PP=1 in the test process."""
    from megaslim.runtime import init_runtime

    return init_runtime(tp=1, pp=1)


@pytest.fixture(scope="session")
def tiny_llama_tok(tmp_path_factory):
    """A tiny random HF Llama with a small BPE tokenizer (vocab 320), usable by every launcher."""
    from tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tinytok") / "llama", tokenizer=True, seed=3)


@pytest.fixture(scope="session")
def tiny_pruned(tiny_llama_tok, tmp_path_factory):
    """launch/prune.py once on tiny_llama_tok: hidden 64 -> 48, ffn 128 -> 96, 4 -> 2 layers. The folder
    holds prune_plan.json and the pruned student checkpoint (shared by the distillation tests). One plain
    process (world 1), so no torchrun agent is paid for a fixture."""
    text = ROOT / "tests" / "data" / "hamlet_excerpt.txt"
    out = tmp_path_factory.mktemp("plan")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "prune.py"), f"model.load={tiny_llama_tok}", f"output_dir={out}",
         f"data.calib_path={text}", f"data.eval_path={text}", "data.seq_length=32", "importance.num_samples=8",
         "eval.num_samples=2", "prune.export_config.hidden_size=48", "prune.export_config.ffn_hidden_size=96",
         "prune.export_config.num_layers=2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-8000:]
    return out


class LaunchServer:
    """One warm interpreter (tests/workers/launch_many.py --serve) that runs `python launch/X.py ARGS` cases
    each in a forked child, as the launcher's __main__: its own exit code, stdout and stderr. It saves the
    torch/transformers import of every single-process launcher run that checks only the process's output."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "workers" / "launch_many.py"), "--serve"],
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def many(self, cases, jobs=1, timeout=900):
        """cases: [(launcher path, [args...], cwd or None), ...] -> [subprocess.CompletedProcess, ...]."""
        todo = [[str(script), [str(a) for a in args], str(cwd or ROOT)] for script, args, cwd in cases]
        self.proc.stdin.write(json.dumps({"cases": todo, "jobs": jobs, "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the launch server died (exit {self.proc.poll()})"
        done = []
        for (script, args, _), r in zip(todo, json.loads(line)):
            if r["timed_out"]:
                raise subprocess.TimeoutExpired([script, *args], timeout, r["stdout"], r["stderr"])
            done.append(subprocess.CompletedProcess([script, *args], r["returncode"], r["stdout"], r["stderr"]))
        return done

    def __call__(self, script, *args, cwd=None, timeout=300):
        """`python script args` (script: a path, or a name under launch/) -> subprocess.CompletedProcess."""
        script = Path(script)
        if not script.is_absolute():
            script = ROOT / "launch" / script
        return self.many([(script, args, cwd)], timeout=timeout)[0]

    def close(self):
        self.proc.stdin.close()
        self.proc.kill()  # idle between requests: nothing of its own to finish
        self.proc.wait()


@pytest.fixture(scope="session")
def launch():
    """launch("evaluate.py", *overrides) -> CompletedProcess, from the session's warm LaunchServer."""
    server = LaunchServer()
    yield server
    server.close()
