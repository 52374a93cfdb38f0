import os
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
    holds prune_plan.json and the pruned student checkpoint (shared by the distillation tests)."""
    from dist_utils import ROOT, torchrun

    text = ROOT / "tests" / "data" / "hamlet_excerpt.txt"
    out = tmp_path_factory.mktemp("plan")
    torchrun(ROOT / "launch" / "prune.py", f"model.load={tiny_llama_tok}", f"output_dir={out}",
             f"data.calib_path={text}", f"data.eval_path={text}", "data.seq_length=32",
             "importance.num_samples=8", "eval.num_samples=2", "prune.export_config.hidden_size=48",
             "prune.export_config.ffn_hidden_size=96", "prune.export_config.num_layers=2", nproc=1)
    return out
