"""Bad input (issue 17): every launcher, run as one process, refuses before compute with exit code 2, one
`error:` line naming the key or file, no traceback, and nothing new in output_dir. Most cases run with
`--check` (the same checks a real run makes before any process group or weights); the few only a real run
can meet (a refused unpickle) or that prove a real run stops as early are run without it."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from dist_utils import ROOT

TEXT = ROOT / "tests" / "data" / "hamlet_excerpt.txt"


@pytest.fixture(scope="module")
def bad(tiny_llama_tok, tmp_path_factory):
    """Bad files beside the tiny model: {name: path}."""
    import torch

    d = tmp_path_factory.mktemp("bad")
    files = {"yaml": d / "bad.yaml", "binary": d / "bin.txt", "text5": d / "five.jsonl", "empty": d / "empty.txt",
             "afile": d / "afile", "plan": d / "bad_plan.json", "gguf": d / "bad.gguf"}
    files["yaml"].write_text("model: [unclosed\n  load: x\n")
    files["binary"].write_bytes(b"\xff\xfe\x00\x01binary\x80\x81" * 50)
    files["text5"].write_text('{"text": 5}\n')
    files["empty"].write_text("")
    files["afile"].write_text("x")
    files["plan"].write_text("{not json")
    files["gguf"].write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    (d / "fake.bin").write_bytes(b"junk")
    (d / "fake.idx").write_bytes(b"junkjunk")
    files["indexed"] = d / "fake"

    def model(name, mutate):
        m = d / name
        shutil.copytree(tiny_llama_tok, m)
        mutate(m)
        files[name] = m

    def weights(m):
        return next(m.glob("*.safetensors"))

    model("trunc", lambda m: weights(m).write_bytes(weights(m).read_bytes()[:1000]))
    model("corrupt", lambda m: weights(m).write_bytes(b"\x10" + b"\x00" * 7 + b"{garbage-header}" + b"\0" * 64))

    def wider(m):
        cfg = json.loads((m / "config.json").read_text())
        (m / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 256}))
    model("shapes", wider)

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    def pickled(m):
        weights(m).unlink()
        torch.save({"x": Evil()}, m / "pytorch_model.bin")
    model("pickle", pickled)

    rc = d / "remote_tok"
    rc.mkdir()
    shutil.copy(tiny_llama_tok / "tokenizer.json", rc)
    (rc / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "MyTok", "auto_map": {"AutoTokenizer": ["tok.MyTok", null]}}')
    (rc / "tok.py").write_text("from transformers import PreTrainedTokenizerFast\n"
                               "class MyTok(PreTrainedTokenizerFast): pass\n")
    files["remote_tok"] = rc
    files["dir"] = d
    return files


STUDENT = "distill.student.load={model}"
# (id, launcher, overrides ({model}, {out} and bad-file names filled in), what the error line says, --check)
CASES = [
    # refused only after minutes of compute
    ("drop_layers_range", "prune", ["prune.drop_layers=[7]"], "prune.drop_layers [7] out of range", True),
    ("drop_layers_range_run", "prune", ["prune.drop_layers=[7]"], "prune.drop_layers [7] out of range", False),
    ("kl_temperature_0", "distill", ["distill.logit_kl_temperature=0", STUDENT], "distill.logit_kl_temperature",
     True),
    ("top_k_0", "distill", ["distill.kl=topk", "distill.top_k=0", STUDENT], "distill.top_k must be >= 1", True),
    ("lr_negative", "distill", ["train.lr=-1", STUDENT], "train.lr=-1.0 must be >= 0", True),
    ("global_batch_0", "distill", ["train.global_batch_size=0", STUDENT], "train.global_batch_size must be >= 1",
     True),
    ("bad_indexed", "distill", ["data.train_path={indexed}", STUDENT], "fake.idx: not a readable megatron", True),
    ("unwritable_output", "prune", ["prune.export_config.hidden_size=48", "output_dir=/proc/megaslim_out"],
     "output_dir=/proc/megaslim_out: cannot write", True),
    # tracebacks instead of one line
    ("malformed_yaml", "evaluate", ["--config", "{yaml}"], "bad.yaml: not valid YAML (line 2", True),
    ("micro_batch_0", "distill", ["train.micro_batch_size=0", STUDENT], "train.micro_batch_size must be >= 1",
     True),
    ("binary_text", "evaluate", ["data.eval_path={binary}"], "bin.txt: not UTF-8 text", True),
    ("text_not_string", "evaluate", ["data.eval_path={text5}"], 'five.jsonl:1: "text" is int 5', True),
    ("truncated_safetensors", "evaluate", ["model.load={trunc}"], "model.safetensors: not a safetensors file",
     True),
    ("corrupt_safetensors", "evaluate", ["model.load={corrupt}"], "corrupt safetensors header", True),
    ("corrupt_gguf", "evaluate", ["model.load={gguf}"], "model.load=", True),
    ("missing_plan", "prune", ["prune.plan_path={dir}/nope.json"], "nope.json not found (prune.plan_path", True),
    ("malformed_plan", "prune", ["prune.plan_path={plan}"], "bad_plan.json is not a prune_plan.json", True),
    ("file_for_dir", "evaluate", ["output_dir={afile}/sub"], "afile/sub has a file on its way", True),
    ("shapes_vs_weights", "evaluate", ["model.load={shapes}"], "config.json disagrees with the weights", True),
    ("refused_unpickle", "evaluate", ["model.load={pickle}"], "pytorch_model.bin: refused to unpickle", False),
    # accepted silently
    ("seq_length_too_long", "evaluate", ["data.seq_length=1024"], "data.seq_length=1024 exceeds", True),
    ("duplicate_drop_layers", "prune", ["prune.drop_layers=[1,1]"], "prune.drop_layers lists layer(s) [1]", True),
    ("eval_interval_negative", "distill", ["eval.interval=-1", STUDENT], "eval.interval must be >= 0", True),
    ("save_interval_negative", "distill", ["checkpoint.save_interval=-1", STUDENT],
     "checkpoint.save_interval must be >= 0", True),
    ("no_prune_target", "prune", [], "nothing to prune", True),
    # wording
    ("missing_teacher", "distill", ["distill.teacher.load={dir}/noteacher", STUDENT],
     "distill.teacher.load=", True),
    ("missing_tokenizer_dir", "evaluate", ["model.tokenizer={dir}/notok"], "model.tokenizer=", True),
    ("directory_as_data", "evaluate", ["data.eval_path={dir}"], "is a directory", True),
    ("remote_code", "evaluate", ["model.tokenizer={remote_tok}"], "model.trust_remote_code=true", True),
    ("empty_file", "evaluate", ["data.eval_path={empty}"], "empty.txt: the file is empty", True),
    # more of the same kind, for every launcher
    ("teacher_logits_top_k_vocab", "teacher_logits", ["distill.top_k=100000"], "distill.top_k=100000", True),
    ("generate_output_dir", "generate", ["generate.output={dir}"], "generate.output=", True),
    ("export_hf_file", "export_hf", ["export.hf_dir={afile}"], "export.hf_dir=", True),
    ("import_ckpt_file_output", "import_ckpt", ["output_dir={afile}"], "output_dir=", True),
    ("compress_drop_layers", "compress", ["prune.drop_layers=[0]"], "compress takes its targets", True),
]


def _base(model, out):
    return [f"model.load={model}", f"data.train_path={TEXT}", f"data.eval_path={TEXT}", f"data.calib_path={TEXT}",
            "data.seq_length=32", "importance.num_samples=4", "eval.num_samples=2", "train.train_iters=2",
            "train.warmup_iters=0", "train.global_batch_size=2", "train.micro_batch_size=1", f"output_dir={out}"]


def _args(case, model, bad, out):
    _, _, overrides, _, check = case
    names = {**{k: str(v) for k, v in bad.items()}, "model": str(model), "out": str(out)}
    return _base(model, out) + [a.format(**names) for a in overrides] + (["--check"] if check else [])


@pytest.fixture(scope="module")
def outcomes(launch, tiny_llama_tok, bad, tmp_path_factory):
    """Every case's (output_dir, result), all run by the session's warm interpreter (conftest.LaunchServer:
    tests/workers/launch_many.py forks a child per case that runs the launcher as `python launch/X.py`
    would), two cases at a time (each has its own output_dir)."""
    root = tmp_path_factory.mktemp("cases")
    outs = {c[0]: root / c[0] / "out" for c in CASES}
    todo = [(ROOT / "launch" / f"{c[1]}.py", _args(c, tiny_llama_tok, bad, outs[c[0]]), None) for c in CASES]
    results = launch.many(todo, jobs=2, timeout=600)
    return {c[0]: (outs[c[0]], {"returncode": r.returncode, "stdout": r.stdout, "stderr": r.stderr})
            for c, r in zip(CASES, results)}


def _assert_refused(proc: dict, out, needle: str) -> None:
    lines = (proc["stdout"] + proc["stderr"]).splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert proc["returncode"] == 2, proc["stderr"][-3000:]
    assert len(errors) == 1 and needle in errors[0], errors or proc["stderr"][-3000:]
    assert "Traceback" not in proc["stderr"]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_refused_in_one_line(outcomes, case):
    out, proc = outcomes[case]
    _assert_refused(proc, out, next(c[3] for c in CASES if c[0] == case))


def test_a_real_process_refuses_alike(tiny_llama_tok, bad, tmp_path):
    """The same as one plain `python launch/prune.py` (no fork, no --check): refused before the importance pass."""
    out = tmp_path / "out"
    case = next(c for c in CASES if c[0] == "drop_layers_range_run")
    p = subprocess.run([sys.executable, str(ROOT / "launch" / "prune.py"), *_args(case, tiny_llama_tok, bad, out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=180)
    _assert_refused({"returncode": p.returncode, "stdout": p.stdout, "stderr": p.stderr}, out, case[3])


def test_check_says_ok_and_writes_nothing(launch, tiny_llama_tok, tmp_path):
    out = tmp_path / "out"
    proc = launch("distill.py", "--check", *_base(tiny_llama_tok, out), f"distill.student.load={tiny_llama_tok}",
                  timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok: distill:") and "error" not in proc.stderr
    assert not out.exists()


def test_preprocess_check(launch, tiny_llama_tok, bad, tmp_path):
    base = ["preprocess_data.py", f"model.load={tiny_llama_tok}", "--check"]
    ok = launch(*base, "--input", TEXT, "--output-prefix", tmp_path / "p", timeout=180)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: preprocess_data"), ok.stderr[-3000:]
    assert not list(tmp_path.iterdir())
    no = launch(*base, "--input", bad["dir"], "--output-prefix", bad["afile"] / "p", timeout=180)
    assert no.returncode == 2 and "Traceback" not in no.stderr
    assert len([line for line in no.stderr.splitlines() if line.startswith("error:")]) == 1
