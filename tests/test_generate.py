"""Synthetic-data generation: seeded sampling, KV cache == full recompute, prompts from the corpus,
TP=2 output == TP=1, valid JSONL, LM-only training on it, bad input."""
import json

import pytest
import torch
from dist_utils import ROOT, torchrun

TEXT = ROOT / "tests" / "data" / "hamlet_excerpt.txt"
GEN = ["generate.num_prompts=6", "generate.batch_size=4", "generate.max_new_tokens=10", "generate.prompt_length=8",
       "generate.temperature=0.9", "generate.top_p=0.9"]


@pytest.fixture(scope="module")
def teacher(megatron_tp1, tiny_llama_tok):
    from megaslim.config import ModelConfig
    from megaslim.sources import load_model

    model, arch, _ = load_model(ModelConfig(load=str(tiny_llama_tok)))
    return model, arch


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_tok):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama_tok))


@pytest.fixture(scope="module")
def prefix(tokenizer):
    from megaslim.data.indexed import cached_indexed

    return cached_indexed(TEXT, tokenizer)


def test_sample_next():
    from megaslim.distill.generate import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, -1)
    assert torch.all(sample_next(logits, temperature=0, top_p=1.0) == 0)
    assert torch.all(sample_next(logits, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(0)) == 0)
    nucleus = sample_next(logits, temperature=1.0, top_p=0.6, generator=torch.Generator().manual_seed(0))
    assert set(nucleus.tolist()) == {0, 1}  # 0.5 < 0.6 <= 0.8: the nucleus is the two most probable
    full = sample_next(logits, temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(0))
    assert set(full.tolist()) == {0, 1, 2, 3} and abs((full == 0).float().mean().item() - 0.5) < 0.05
    again = sample_next(logits, temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(full, again)


def test_prompts_are_seeded_corpus_windows(prefix):
    from megaslim.data.indexed import iter_token_documents
    from megaslim.distill.generate import draw_prompts
    from megaslim.errors import MegaslimError

    prompts = draw_prompts(prefix, num_prompts=20, prompt_length=8, seed=5)
    assert prompts == draw_prompts(prefix, num_prompts=20, prompt_length=8, seed=5)
    assert prompts != draw_prompts(prefix, num_prompts=20, prompt_length=8, seed=6)
    docs = [d.tolist() for d in iter_token_documents(prefix)]
    for p in prompts:
        assert len(p) == 8
        assert any(d[i:i + 8] == p for d in docs for i in range(len(d) - 8)), p  # a window before the EOS
    with pytest.raises(MegaslimError, match="empty prompt set"):
        draw_prompts(prefix, num_prompts=4, prompt_length=10 ** 7, seed=0)


def test_prompts_file_and_batches(tokenizer, tmp_path):
    from megaslim.distill.generate import make_batches, prompts_from_file
    from megaslim.errors import MegaslimError

    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in ["To be", "or not to be", "To be", "that is"]))
    prompts = prompts_from_file(f, tokenizer, num_prompts=10)
    assert len(prompts) == 4 and prompts[0] == prompts[2]
    batches = make_batches(prompts, 2)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3]
    assert all(len({len(prompts[i]) for i in b}) == 1 and len(b) <= 2 for b in batches)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(MegaslimError, match="empty prompt set"):
        prompts_from_file(empty, tokenizer, num_prompts=10)


def test_kv_cache_equals_recompute_and_seeded(teacher, prefix):
    from megaslim.distill.generate import draw_prompts, generate_batch

    model, arch = teacher
    prompts = torch.tensor(draw_prompts(prefix, num_prompts=3, prompt_length=6, seed=1))

    def gen(seed, kv, temperature=0.9):
        return generate_batch(model, prompts, vocab_size=arch.vocab_size, max_new_tokens=12, temperature=temperature,
                              top_p=0.9, generator=torch.Generator().manual_seed(seed), eos_id=None, kv_cache=kv)

    a = gen(0, True)
    assert [len(r) for r in a] == [12, 12, 12]
    assert a == gen(0, False) == gen(0, True)
    assert a != gen(1, True)
    assert gen(0, True, temperature=0) == gen(3, False, temperature=0)
    assert all(0 <= t < arch.vocab_size for r in a for t in r)


@pytest.fixture(scope="module")
def generated(tiny_llama_tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    torchrun(ROOT / "launch" / "generate.py", f"model.load={tiny_llama_tok}", f"output_dir={out}",
             f"data.train_path={TEXT}", "parallel.tensor_model_parallel_size=2", *GEN, nproc=2)
    return out


@pytest.mark.dist
def test_launcher_tp2_output_equals_in_process_tp1(generated, teacher, tokenizer, prefix):
    """The JSONL written at TP=2 (KV cache) holds, line by line, what TP=1 generates in this process from
    the same seeded corpus prompts: the output depends on the seed only."""
    from megaslim.distill.generate import batch_generator, draw_prompts, generate_batch, make_batches, to_record

    lines = (generated / "synthetic.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert len(records) == 6
    assert all(set(r) >= {"text", "prompt", "completion", "prompt_tokens", "completion_tokens"} for r in records)
    summary = json.loads((generated / "generate.json").read_text())
    assert summary["num_prompts"] == 6 and summary["seed"] == 1234
    model, arch = teacher
    prompts = draw_prompts(prefix, num_prompts=6, prompt_length=8, seed=1234)
    expect = {}
    for j, idx in enumerate(make_batches(prompts, 4)):
        outs = generate_batch(model, torch.tensor([prompts[i] for i in idx]), vocab_size=arch.vocab_size,
                              max_new_tokens=10, temperature=0.9, top_p=0.9,
                              generator=batch_generator(1234, j, "cpu"), eos_id=tokenizer.eos_token_id)
        expect.update(zip(idx, outs))
    assert records == [to_record(tokenizer, prompts[i], expect[i], tokenizer.eos_token_id) for i in range(6)]
    assert not list(generated.glob(".*tmp*"))


@pytest.mark.dist
def test_student_trains_with_lm_loss_on_synthetic_data(tiny_llama_tok, generated, tmp_path):
    out = tmp_path / "lm"
    torchrun(ROOT / "launch" / "distill.py", f"model.load={tiny_llama_tok}", f"distill.student.load={tiny_llama_tok}",
             f"output_dir={out}", f"data.train_path={generated / 'synthetic.jsonl'}", f"data.eval_path={TEXT}",
             "data.seq_length=16", "train.micro_batch_size=2", "train.global_batch_size=4", "train.train_iters=2",
             "train.warmup_iters=0", "eval.num_samples=2", "data.micro_batch_size=2", "distill.kd_loss_scale=0",
             "distill.skip_lm_loss=false", nproc=1)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(rows) == 2 and all(r["kd_loss"] == 0 and r["loss"] == r["lm_loss"] > 0 for r in rows)
    assert json.loads((out / "distill.json").read_text())["mode"] == "lm"


def test_bad_input(launch, tiny_llama_tok, tmp_path):
    from megaslim.commands.cli import parse_args
    from megaslim.commands.generate import validate
    from megaslim.config import ConfigError
    from megaslim.errors import MegaslimError

    base = [f"model.load={tiny_llama_tok}", f"output_dir={tmp_path}", f"data.train_path={TEXT}"]
    cfg = parse_args("", [*base, "generate.prompt_length=100000"])
    with pytest.raises(MegaslimError, match="empty prompt set"):
        validate(cfg)
    cfg = parse_args("", [*base, "parallel.pipeline_model_parallel_size=2"])
    with pytest.raises(MegaslimError, match="pipeline_model_parallel_size=1"):
        validate(cfg)
    cfg = parse_args("", [*base, "generate.max_new_tokens=1000"])
    with pytest.raises(MegaslimError, match="max_position_embeddings"):
        validate(cfg)
    with pytest.raises(ConfigError, match="generate.nope"):
        parse_args("", [*base, "generate.nope=1"])
    with pytest.raises(ConfigError, match="generate.top_p"):
        parse_args("", [*base, "generate.top_p=abc"])
    yaml = tmp_path / "c.yaml"
    yaml.write_text("generate:\n  num_prompts: 3\ndata:\n  seq_length: 64\n")
    cfg = parse_args("", ["--config", str(yaml), *base])
    s = cfg.generate
    assert s.num_prompts == 3 and cfg.data.seq_length == 64
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    proc = launch("generate.py", *base, f"generate.prompts_path={empty}", timeout=120)
    assert proc.returncode == 2 and "empty prompt set" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "synthetic.jsonl").exists()
