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
    from megaslim.model.load import default_model_dir

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
