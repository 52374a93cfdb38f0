"""Megatron-LM torch_dist checkpoints in and out (megaslim.megatron_lm): a checkpoint laid out as Megatron-LM's
save_checkpoint writes it (args Namespace in common.pt, GPTModel keys, RNG/optimizer entries, tracker), saved
at TP=2 x PP=2 on gloo, loads at TP=1 and PP=2 with the logits of the same weights loaded from HF; the export
reads back with identical weights and args; hostile or inexpressible checkpoints are refused in one line."""
import argparse
import os
import shutil
from pathlib import Path

import pytest
import torch
from dist_utils import ROOT, torchrun

from megaslim import megatron_lm
from megaslim.config import ModelConfig
from megaslim.errors import MegaslimError
from megaslim.megatron_lm.args import arch_from_args, args_from_arch, pretrain_gpt_flags
from megaslim.model.arch import LLAMA3_ROPE_FIXED, ModelArch
from megaslim.sources import load_model, resolve_source

ITER = 100


@pytest.fixture(scope="module")
def mlm_root(tiny_llama, tmp_path_factory):
    """tiny_llama saved as Megatron-LM would at TP=2 x PP=2 (four ranks), iteration 100."""
    root = tmp_path_factory.mktemp("mlm") / "run"
    torchrun("megatron_lm_save.py", tiny_llama, root, 2, 2, ITER, nproc=4, timeout=400)
    return root


def _weights(model):
    from megaslim.model.state import named_params

    return {n: p.detach().clone() for n, p in named_params(model)}


def _tokens():
    torch.manual_seed(3)
    return torch.randint(0, 250, (2, 16))


def _logits(model):
    tokens = _tokens()
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        return model(tokens, pos, None)


@pytest.fixture(scope="module")
def reference(tiny_llama, megatron_tp1):
    model, arch, _ = load_model(ModelConfig(load=str(tiny_llama)))
    return arch, _weights(model), _logits(model)


def _assert_same(model, reference):
    _, weights, logits = reference
    got = _weights(model)
    assert got.keys() == weights.keys()
    for name, w in weights.items():
        assert torch.equal(got[name], w), name
    assert torch.equal(_logits(model), logits)


def _common(folder: Path) -> dict:
    return megatron_lm.read_common(folder / "common.pt")


def _copy_with_common(src: Path, dst: Path, common: dict, *, data: bool = True) -> Path:
    """A copy of the iteration folder `src` as dst/iter_0000100 (+ tracker) with another common.pt;
    data=False leaves the tensor files out (a refusal then provably reads no tensor)."""
    folder = dst / src.name
    shutil.copytree(src, folder, ignore=None if data else shutil.ignore_patterns("*.distcp", ".metadata"))
    torch.save(common, folder / "common.pt")
    (dst / megatron_lm.TRACKER).write_text(str(ITER))
    return dst


@pytest.mark.dist
def test_tp2pp2_megatron_lm_checkpoint_loads_at_tp1_like_hf(mlm_root, reference, tiny_llama):
    for path in (mlm_root, mlm_root / f"iter_{ITER:07d}"):
        source = resolve_source(str(path))
        assert (source.kind, source.path) == ("megatron_lm", mlm_root / f"iter_{ITER:07d}")
        model, arch, _ = load_model(ModelConfig(), source)
        hf_arch = reference[0]
        assert arch.vocab_size == 256  # Megatron-LM's padded vocabulary (args carry no vocab_size)
        from dataclasses import replace
        assert replace(arch, vocab_size=hf_arch.vocab_size, bos_token_id=1, eos_token_id=2) == hf_arch
        _assert_same(model, reference)


@pytest.mark.dist
def test_release_folder_loads(mlm_root, reference, tmp_path):
    shutil.copytree(mlm_root / f"iter_{ITER:07d}", tmp_path / "release")
    (tmp_path / megatron_lm.TRACKER).write_text("release")
    source = resolve_source(str(tmp_path))
    assert source.path == tmp_path / "release"
    _assert_same(load_model(ModelConfig(), source)[0], reference)


@pytest.mark.dist
def test_loads_at_pp2(mlm_root, reference, tmp_path):
    torch.save(_tokens(), tmp_path / "tokens.pt")
    torchrun("forward_logits.py", mlm_root, 1, 2, tmp_path / "tokens.pt", tmp_path / "logits.pt", nproc=2)
    got = torch.load(tmp_path / "logits.pt")
    assert torch.allclose(got, reference[2], atol=1e-5, rtol=0)


@pytest.mark.dist
@pytest.mark.parametrize("evil", ["system", "eval"])
def test_hostile_common_pt_refused_nothing_executed(mlm_root, tmp_path, evil):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            if evil == "system":
                return os.system, (f"touch {marker}",)
            return eval, (f"open({str(marker)!r}, 'w')",)

    common = _common(mlm_root / f"iter_{ITER:07d}")
    common["args"].hostile = Evil()
    root = _copy_with_common(mlm_root / f"iter_{ITER:07d}", tmp_path / "run", common)
    with pytest.raises(MegaslimError) as err:
        resolve_source(str(root))
    message = str(err.value)
    assert "\n" not in message and "refusing to unpickle" in message
    assert ("posix.system" if evil == "system" else "builtins.eval") in message
    assert not marker.exists()


# (option, value, the words the refusal must hold, num_experts): MoE-only options count with --num-experts set
@pytest.mark.dist
@pytest.mark.parametrize("option,value,named,experts", [
    ("multi_latent_attention", True, "MLA", None),
    ("mtp_num_layers", 1, "multi-token prediction", None),
    ("hybrid_layer_pattern", "M*M*", "Mamba", None),
    ("add_bias_linear", True, "biases", None),
    ("normalization", "LayerNorm", "apply-layernorm-1p", None),
    ("position_embedding_type", "learned_absolute", "RoPE", None),
    ("moe_layer_freq", [1, 0, 1, 0], "mixed dense and MoE", 4),
    ("moe_router_group_topk", 2, "grouped top-k", 4),
    ("moe_expert_capacity_factor", 1.25, "token dropping", 4),
    ("moe_router_score_function", "sigmoid", "non-softmax", 4),
    ("moe_router_enable_expert_bias", True, "expert bias", 4),
])
def test_inexpressible_options_refused_by_name_before_tensors(mlm_root, tmp_path, option, value, named, experts):
    common = _common(mlm_root / f"iter_{ITER:07d}")
    common["args"].num_experts = experts
    setattr(common["args"], option, value)
    root = _copy_with_common(mlm_root / f"iter_{ITER:07d}", tmp_path / "run", common, data=False)
    with pytest.raises(MegaslimError, match=f"{option}=.*{named}") as err:
        resolve_source(str(root))
    assert "\n" not in str(err.value)


@pytest.mark.dist
@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_megatron_lm_moe_checkpoint_saved_at_ep2_loads_at_ep1_like_hf(tmp_path, megatron_tp1, family):
    """A Megatron-LM MoE run (--num-experts ... --moe-grouped-gemm, EP=2) in, as one process: the same weights and
    logits as the HF model, the router and shared-expert settings read from its args."""
    from moe_tiny import make_tiny_moe

    src = make_tiny_moe(tmp_path / "hf", family, seed=5)
    torchrun("megatron_lm_save.py", src, tmp_path / "run", 1, 1, ITER, "float32", 2, nproc=2, timeout=300)
    model, arch, _ = load_model(ModelConfig(load=str(tmp_path / "run")))
    hf_model, hf_arch, _ = load_model(ModelConfig(load=str(src)))
    assert (arch.num_moe_experts, arch.moe_router_topk, arch.family) == (4, 2, family)
    assert arch.moe_aux_loss_coeff == pytest.approx(0.01) and arch.qkv_bias == hf_arch.qkv_bias
    for field in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_shared_expert_gate",
                  "moe_router_pre_softmax", "qk_layernorm", "num_query_groups"):
        assert getattr(arch, field) == getattr(hf_arch, field), field
    got, want = _weights(model), _weights(hf_model)
    assert got.keys() == want.keys() and any(".experts.local_experts.3." in n for n in got)
    for name, w in want.items():
        assert torch.equal(got[name], w), name
    tokens, pos = _tokens() % 128, torch.arange(16).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        assert torch.equal(model(tokens, pos, None), hf_model(tokens, pos, None))


@pytest.mark.dist
def test_torch_dist_without_args_and_legacy_layout_refused(mlm_root, tmp_path):
    common = _common(mlm_root / f"iter_{ITER:07d}")
    del common["args"]
    root = _copy_with_common(mlm_root / f"iter_{ITER:07d}", tmp_path / "noargs", common, data=False)
    with pytest.raises(MegaslimError, match="carries no Megatron-LM args"):
        resolve_source(str(root))
    legacy = tmp_path / "legacy" / "iter_0000100" / "mp_rank_00"
    legacy.mkdir(parents=True)
    (legacy / "model_optim_rng.pt").write_bytes(b"")
    (legacy.parents[1] / megatron_lm.TRACKER).write_text("100")
    with pytest.raises(MegaslimError, match="legacy per-rank"):
        resolve_source(str(legacy.parents[1]))


def test_megaslim_checkpoints_are_not_taken_for_megatron_lm(tmp_path):
    own = tmp_path / "iter_0000000"
    own.mkdir()
    for name in ("megaslim.json", "common.pt", "metadata.json"):
        (own / name).write_text("{}")
    assert not megatron_lm.looks_like(own)
    (tmp_path / "latest").write_text("0")
    assert not megatron_lm.looks_like(tmp_path)


_ARCHS = [
    ModelArch(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8, num_query_groups=4,
              kv_channels=8, vocab_size=250, tie_word_embeddings=True, family="llama", bos_token_id=1,
              eos_token_id=2),
    ModelArch(num_layers=2, hidden_size=48, ffn_hidden_size=96, num_attention_heads=6, num_query_groups=2,
              kv_channels=16, vocab_size=320, qkv_bias=True, family="qwen2", rotary_base=1e6, norm_epsilon=1e-6),
    ModelArch(num_layers=3, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=4,
              kv_channels=16, vocab_size=500, qk_layernorm=True, family="qwen3",
              rope_scaling={"rope_type": "llama3", "factor": 8.0, **LLAMA3_ROPE_FIXED}),
    ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=256, num_attention_heads=8, num_query_groups=2,
              kv_channels=8, vocab_size=256, family="nemotron", gated=False, activation="relu2",
              normalization="LayerNorm1P", rotary_percent=0.5),
    ModelArch(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
              kv_channels=8, vocab_size=128, qkv_bias=True, family="qwen2_moe", num_moe_experts=8, moe_router_topk=2,
              moe_ffn_hidden_size=16, moe_shared_expert_intermediate_size=24, moe_shared_expert_gate=True,
              moe_router_pre_softmax=True, moe_aux_loss_coeff=0.001),
]


@pytest.mark.parametrize("arch", _ARCHS, ids=lambda a: a.family)
def test_args_table_round_trip(arch):
    args = args_from_arch(arch, padded_vocab_size=512, divisible_by=128, tp=2, pp=1, world_size=2,
                          params_dtype=torch.bfloat16, tokenizer_model=None, iteration=0)
    assert isinstance(args, argparse.Namespace)
    assert arch_from_args(args, "test") == arch
    assert args.swiglu == arch.gated and args.squared_relu == (arch.activation == "relu2")
    assert args.group_query_attention == (arch.num_query_groups != arch.num_attention_heads)
    flags = " ".join(pretrain_gpt_flags(args))
    assert f"--num-layers {arch.num_layers} --hidden-size {arch.hidden_size}" in flags
    assert f"--kv-channels {arch.kv_channels}" in flags and "--padded-vocab-size 512" in flags
    assert ("--swiglu" in flags) == arch.gated and ("--qk-layernorm" in flags) == arch.qk_layernorm
    assert ("--untie-embeddings-and-output-weights" in flags) == (not arch.tie_word_embeddings)
    assert ("--use-rope-scaling" in flags) == bool(arch.rope_scaling) and "--bf16" in flags
    if arch.is_moe:
        assert (f"--num-experts {arch.num_moe_experts} --moe-router-topk {arch.moe_router_topk} "
                f"--moe-ffn-hidden-size {arch.moe_ffn_hidden_size}") in flags
        assert "--moe-shared-expert-gate" in flags and "--moe-router-pre-softmax" in flags
    else:
        assert "--num-experts" not in flags


@pytest.mark.dist
def test_export_reads_back_with_identical_weights_and_args(tiny_llama_tok, tmp_path, megatron_tp1):
    out = tmp_path / "mlm"
    proc = torchrun("megatron_lm_export.py", tiny_llama_tok, out, 2, 1, 5, nproc=2)
    assert f"pretrain_gpt.py --load {out} --finetune --num-layers 4 --hidden-size 64" in proc.stdout
    assert "--padded-vocab-size 512" in proc.stdout and "--tokenizer-model" in proc.stdout
    assert (out / megatron_lm.TRACKER).read_text() == "5"
    assert sorted(p.name for p in out.iterdir()) == ["iter_0000005", megatron_lm.TRACKER]
    folder = out / "iter_0000005"
    assert not (folder / "megaslim.json").exists() and not (out / "latest").exists()
    source = resolve_source(str(out))
    assert source.kind == "megatron_lm" and source.tokenizer_dir == folder / "tokenizer"
    model, arch, _ = load_model(ModelConfig(), source)
    hf_model, hf_arch, _ = load_model(ModelConfig(load=str(tiny_llama_tok)))
    assert arch == hf_arch
    want, got = _weights(hf_model), _weights(model)
    assert got["embedding.word_embeddings.weight"].shape[0] == 512  # padded at TP=2: 320 -> 2 x 128 x 2
    rows = hf_arch.vocab_size  # at TP=1 the HF load pads to 384 rows; the tokens' rows are the weights
    assert got.keys() == want.keys() and all(torch.equal(got[k][:rows], want[k][:rows]) for k in want)
    common = _common(folder)
    assert (common["checkpoint_version"], common["iteration"]) == (3.0, 5)
    expected = args_from_arch(hf_arch, padded_vocab_size=512, divisible_by=128, tp=2, pp=1, world_size=2,
                              params_dtype=torch.float32, tokenizer_model=str(folder / "tokenizer"), iteration=5)
    assert vars(common["args"]) == vars(expected)


@pytest.mark.dist
def test_prune_and_distill_write_export_megatron_dir(tiny_llama_tok, tmp_path, megatron_tp1):
    text = ROOT / "tests" / "data" / "hamlet_excerpt.txt"
    out, mlm = tmp_path / "prune", tmp_path / "mlm"
    torchrun(ROOT / "launch" / "prune.py", f"model.load={tiny_llama_tok}", f"output_dir={out}",
             f"data.calib_path={text}", f"data.eval_path={text}", "data.seq_length=32", "importance.num_samples=8",
             "eval.num_samples=2", "prune.export_config.hidden_size=48", "prune.export_config.num_layers=2",
             f"export.megatron_dir={mlm}", nproc=1)
    own, own_arch, _ = load_model(ModelConfig(), resolve_source(str(out / "checkpoint")))
    exported, arch, _ = load_model(ModelConfig(), resolve_source(str(mlm)))
    assert arch == own_arch and arch.hidden_size == 48 and arch.num_layers == 2
    a, b = _weights(own), _weights(exported)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    args = _common(mlm / "iter_0000000")["args"]
    assert (args.hidden_size, args.num_layers, args.kv_channels) == (48, 2, 8)

    # the Megatron-LM student distilled from its HF teacher, exported again as a Megatron-LM checkpoint
    dout, dmlm = tmp_path / "distill", tmp_path / "mlm_distilled"
    torchrun(ROOT / "launch" / "distill.py", f"model.load={tiny_llama_tok}", f"distill.student.load={mlm}",
             f"output_dir={dout}", f"data.train_path={text}", f"data.eval_path={text}", "data.seq_length=32",
             "train.micro_batch_size=2", "train.global_batch_size=4", "train.train_iters=2", "train.lr=1e-3",
             "train.min_lr=1e-4", "train.warmup_iters=1", "eval.num_samples=2", "data.micro_batch_size=2",
             f"export.megatron_dir={dmlm}", nproc=1)
    assert (dmlm / megatron_lm.TRACKER).read_text() == "2"
    distilled, darch, _ = load_model(ModelConfig(), resolve_source(str(dmlm)))
    assert darch == arch
    own, _, _ = load_model(ModelConfig(), resolve_source(str(dout / "checkpoint")))
    a, b = _weights(own), _weights(distilled)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _bridge_run_config(tokenizer_model: str) -> str:
    """run_config.yaml as Megatron-Bridge 0.6 writes it (ConfigContainer.to_yaml) for a Llama provider."""
    return f"""model:
  _target_: megatron.bridge.models.llama.llama_provider.LlamaModelProvider
  num_layers: 4
  hidden_size: 64
  ffn_hidden_size: 128
  num_attention_heads: 8
  num_query_groups: 4
  kv_channels: 8
  seq_length: 256
  normalization: RMSNorm
  layernorm_epsilon: 1.0e-05
  layernorm_zero_centered_gamma: false
  gated_linear_unit: true
  activation_func: {{_target_: torch.nn.functional.silu, _call_: false}}
  add_bias_linear: false
  add_qkv_bias: false
  qk_layernorm: false
  position_embedding_type: rope
  rotary_base: 10000
  rotary_percent: 1.0
  rope_scaling: false
  share_embeddings_and_output_weights: true
  vocab_size: 250
  should_pad_vocab: true
  make_vocab_size_divisible_by: 128
  tensor_model_parallel_size: 2
  pipeline_model_parallel_size: 2
  num_moe_experts: null
  multi_latent_attention: false
  mtp_num_layers: null
  window_size: null
  softmax_type: vanilla
  params_dtype: {{_target_: torch.float32, _call_: false}}
  transformer_layer_spec: {{_target_: megatron.bridge.models.gpt_provider.default_layer_spec, _call_: false}}
tokenizer:
  tokenizer_type: HuggingFaceTokenizer
  tokenizer_model: {tokenizer_model}
checkpoint:
  save_optim: true
  save_rng: true
"""


@pytest.mark.dist
@pytest.mark.parametrize("tracker", ["both", "train_state_only"])
def test_megatron_bridge_checkpoint_loads_like_hf(mlm_root, reference, tiny_llama, tmp_path, tracker):
    common = _common(mlm_root / f"iter_{ITER:07d}")
    del common["args"]  # Bridge's common.pt carries no args
    root = _copy_with_common(mlm_root / f"iter_{ITER:07d}", tmp_path / "bridge", common)
    folder = root / f"iter_{ITER:07d}"
    (folder / "run_config.yaml").write_text(_bridge_run_config(str(tiny_llama)))
    state = {"step": torch.tensor(ITER), "consumed_train_samples": torch.tensor(6400)}
    torch.save(state, folder / "train_state.pt")
    torch.save(state, root / "latest_train_state.pt")
    if tracker == "train_state_only":
        (root / megatron_lm.TRACKER).unlink()
    source = resolve_source(str(root))
    assert (source.kind, source.path) == ("megatron_lm", folder)
    model, arch, _ = load_model(ModelConfig(), source)
    assert arch.vocab_size == 250 and arch.num_query_groups == 4 and arch.tie_word_embeddings
    _assert_same(model, reference)
    run_config = (folder / "run_config.yaml").read_text()
    (folder / "run_config.yaml").write_text(
        run_config.replace("num_moe_experts: null", "num_moe_experts: 8\n  moe_router_num_groups: 2"))
    with pytest.raises(MegaslimError, match="moe_router_num_groups=2 .*grouped top-k"):
        resolve_source(str(root))


def test_export_dir_and_config_checks(tmp_path):
    from megaslim.config import ConfigError, load_config
    from megaslim.megatron_lm import check_export_dir

    check_export_dir(tmp_path / "new")
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "iter_0000000.partial").mkdir()
    check_export_dir(tmp_path / "killed")  # only an interrupted export: usable
    (tmp_path / "afile").write_text("x")
    with pytest.raises(MegaslimError, match="is a file"):
        check_export_dir(tmp_path / "afile")
    own = tmp_path / "own"  # a megaslim checkpoint root is not a Megatron-LM export
    (own / "iter_0000000").mkdir(parents=True)
    (own / "latest").write_text("0")
    with pytest.raises(MegaslimError, match="not a Megatron-LM checkpoint root"):
        check_export_dir(own)
    with pytest.raises(ConfigError, match="export.megatron_dir=.* is also output_dir"):
        load_config(None, [f"output_dir={tmp_path}/run", f"export.megatron_dir={tmp_path}/run"])
    assert load_config(None, [f"export.megatron_dir={tmp_path}/m"]).export.megatron_dir == f"{tmp_path}/m"


@pytest.mark.dist
def test_bf16_checkpoint_loads_into_float32_model(tiny_llama, tmp_path, megatron_tp1):
    """Megatron-LM --bf16 runs save bf16 weights; megaslim's model.params_dtype (float32) gets them exactly."""
    torchrun("megatron_lm_save.py", tiny_llama, tmp_path / "bf16", 1, 1, 3, "bfloat16", nproc=1)
    model, _, _ = load_model(ModelConfig(), resolve_source(str(tmp_path / "bf16")))
    bf16, _, _ = load_model(ModelConfig(load=str(tiny_llama), params_dtype="bfloat16"))
    got, want = _weights(model), _weights(bf16)
    assert got.keys() == want.keys()
    for name, w in want.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], w.float()), name
