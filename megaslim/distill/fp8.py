"""FP8 through Transformer Engine for distillation: `distill.fp8: e4m3 | hybrid`.

What it does when asked:
- checks, before any compute, that FP8 can run: TE imports, the TE layer spec is used
  (`model.transformer_impl=transformer_engine`), a GPU with FP8 tensor cores is present (compute
  capability >= 8.9; MXFP8 needs >= 10.0), TE has the requested recipe, and the GEMM shapes are FP8
  aligned (widths of every TP shard and tokens per micro-batch multiples of 16, 32 for MXFP8);
  every failed condition is named in one MegaslimError;
- builds the TE recipe: `delayed` (DelayedScaling with an amax history, default), `tensorwise`
  (Float8CurrentScaling, TE >= 2.2; alias `current`), `blockwise` (Float8BlockScaling, TE >= 2.3,
  Hopper), `mxfp8` (MXFP8BlockScaling, Blackwell); e4m3 = E4M3 everywhere, hybrid = E4M3 forward and
  E5M2 gradients;
- `Fp8Context()` is the autocast the distillation model enters around the teacher and student
  forwards of each micro-batch (one region, so delayed-scaling amaxes are reduced once, over
  megatron's amax reduction group); backward runs outside it, as TE expects;
- weight casts: megatron's TE linears cache their FP8 weights after the first micro-batch; the
  student's cache is refreshed at the first micro-batch of every step (`reset_weight_cache`), the
  frozen teacher's is made once and then reused for the whole run.
Evaluation passes run without FP8 (higher precision), so held-out numbers compare with BF16 runs.
TE is imported only here and only when FP8 is asked for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megaslim.errors import MegaslimError

MODES = {"e4m3": "E4M3", "hybrid": "HYBRID"}
RECIPES = {  # name -> (TE recipe class, minimum compute capability, FP8 alignment)
    "delayed": ("DelayedScaling", (8, 9), 16),
    "tensorwise": ("Float8CurrentScaling", (8, 9), 16),
    "blockwise": ("Float8BlockScaling", (9, 0), 16),
    "mxfp8": ("MXFP8BlockScaling", (10, 0), 32),
}
ALIASES = {"current": "tensorwise"}


@dataclass
class Fp8Settings:
    mode: str  # e4m3 | hybrid
    recipe: str = "delayed"  # delayed | tensorwise (current) | blockwise | mxfp8
    amax_history_len: int = 1024  # delayed scaling only
    amax_compute_algo: str = "max"  # delayed scaling only: max | most_recent
    margin: int = 0


def settings_from_config(cfg) -> Optional[Fp8Settings]:
    """FP8 settings of a config (distill.fp8, fp8_recipe with its aliases, fp8_amax_history_len,
    fp8_amax_compute_algo, fp8_margin), None when `distill.fp8` is unset."""
    d = cfg.distill
    if d.fp8 is None:
        return None
    return Fp8Settings(mode=d.fp8, recipe=ALIASES.get(d.fp8_recipe, d.fp8_recipe),
                       amax_history_len=d.fp8_amax_history_len, amax_compute_algo=d.fp8_amax_compute_algo,
                       margin=d.fp8_margin)


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------
def _shard_widths(arch, tp: int) -> dict[str, int]:
    hd = arch.kv_channels
    return {
        "hidden_size": arch.hidden_size,
        "ffn_hidden_size / TP": arch.ffn_hidden_size // tp,
        "attention width (heads x head_dim) / TP": arch.num_attention_heads * hd // tp,
        "QKV width / TP": (arch.num_attention_heads + 2 * arch.num_query_groups) * hd // tp,
    }


def fp8_problems(s: Fp8Settings, *, te_error: Optional[str], te_version: Optional[str],
                 te_recipes: Optional[set], te_fp8_reason: Optional[str], cuda: bool,
                 capability: Optional[tuple], archs: list, tp: int) -> list[str]:
    """Every reason why FP8 cannot run in this environment with these models (empty list: it can).
    The settings themselves, the layer spec and the tokens per micro-batch are the config's to refuse
    (megaslim.config.validate_distill).

    archs: [(name, ModelArch), ...] of the models that run under FP8. The environment arguments come
    from `environment()`; they are explicit so the logic is testable without a GPU."""
    problems = []
    if te_error is not None:
        problems.append(f"distill.fp8 needs Transformer Engine, which does not import here ({te_error}); "
                        "use an NGC PyTorch container or install megaslim[te] on a CUDA machine")
    if not cuda:
        problems.append("distill.fp8 needs a CUDA GPU with FP8 support (compute capability >= 8.9: "
                        "Ada, Hopper, Blackwell); none is visible")
    elif s.recipe in RECIPES:
        need = RECIPES[s.recipe][1]
        if capability is not None and tuple(capability) < need:
            problems.append(f"this GPU (compute capability {capability[0]}.{capability[1]}) has no FP8 "
                            f"support for recipe {s.recipe}: it needs >= {need[0]}.{need[1]}")
        elif te_fp8_reason:
            problems.append(f"Transformer Engine reports FP8 unavailable: {te_fp8_reason}")
    if te_error is None and s.recipe in RECIPES and te_recipes is not None \
            and RECIPES[s.recipe][0] not in te_recipes:
        problems.append(f"Transformer Engine {te_version or ''} has no {RECIPES[s.recipe][0]} (recipe "
                        f"{s.recipe}); upgrade TE or use fp8_recipe=delayed")
    align = RECIPES.get(s.recipe, (None, None, 16))[2]
    for name, arch in archs:
        bad = {k: v for k, v in _shard_widths(arch, tp).items() if v % align}
        if bad:
            problems.append(f"FP8 GEMMs need widths that are multiples of {align}; the {name} at TP={tp} has "
                            + ", ".join(f"{k}={v}" for k, v in bad.items()))
    return problems


def environment() -> dict:
    """What `fp8_problems` needs to know about this machine (imports TE, if it is there)."""
    env = {"te_error": None, "te_version": None, "te_recipes": None, "te_fp8_reason": None,
           "cuda": torch.cuda.is_available(), "capability": None}
    if env["cuda"]:
        env["capability"] = tuple(torch.cuda.get_device_capability())
    try:
        import transformer_engine
        import transformer_engine.common.recipe as te_recipe
        import transformer_engine.pytorch as te
    except Exception as err:  # ImportError, or a CUDA/cuDNN load failure
        env["te_error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return env
    env["te_version"] = getattr(transformer_engine, "__version__", None)
    env["te_recipes"] = {name for name in dir(te_recipe) if not name.startswith("_")}
    if env["cuda"]:
        ok, reason = _te_fp8_available(te)
        env["te_fp8_reason"] = None if ok else (reason or "unknown reason")
    return env


def _te_fp8_available(te) -> tuple[bool, str]:
    if hasattr(te, "is_fp8_available"):  # TE >= 2.x
        res = te.is_fp8_available(return_reason=True)
        return res if isinstance(res, tuple) else (bool(res), "")
    from transformer_engine.pytorch.fp8 import check_fp8_support  # older TE

    return check_fp8_support()


def check_fp8(cfg, *, archs: list, tp: int) -> Optional[Fp8Settings]:
    """Settings when `distill.fp8` is set and FP8 can run, None when unset; else a MegaslimError
    listing every problem. Call before any compute."""
    s = settings_from_config(cfg)
    if s is None:
        return None
    problems = fp8_problems(s, archs=archs, tp=tp, **environment())
    if problems:
        raise MegaslimError(f"distill.fp8={s.mode} cannot run: " + "; ".join(problems))
    return s


# --------------------------------------------------------------------------------------------------
# recipe and autocast
# --------------------------------------------------------------------------------------------------
def make_recipe(s: Fp8Settings):
    """The Transformer Engine recipe object for `s` (imports TE)."""
    try:
        import transformer_engine.common.recipe as te_recipe
    except Exception as err:  # noqa: BLE001
        raise MegaslimError(f"FP8 recipes need Transformer Engine, which does not import here "
                            f"({type(err).__name__}: {err})") from None
    if s.mode not in MODES:
        raise MegaslimError(f"distill.fp8={s.mode!r} is not one of {list(MODES)}")
    name = ALIASES.get(s.recipe, s.recipe)
    if name not in RECIPES:
        raise MegaslimError(f"FP8 recipe {s.recipe!r} is unknown: choose one of {list(RECIPES)}")
    cls_name = RECIPES[name][0]
    cls = getattr(te_recipe, cls_name, None)
    if cls is None:
        import transformer_engine

        raise MegaslimError(f"Transformer Engine {getattr(transformer_engine, '__version__', '?')} has no "
                            f"{cls_name} (recipe {name}); upgrade TE or use fp8_recipe=delayed")
    fmt = getattr(te_recipe.Format, MODES[s.mode])
    if name == "delayed":
        return cls(fp8_format=fmt, margin=s.margin, amax_history_len=s.amax_history_len,
                   amax_compute_algo=s.amax_compute_algo)
    return cls(fp8_format=fmt)


def autocast(recipe, group=None):
    """TE's FP8 autocast context: `te.pytorch.autocast(recipe=, amax_reduction_group=)` on current TE,
    `te.pytorch.fp8_autocast(fp8_recipe=, fp8_group=)` on older releases."""
    import transformer_engine.pytorch as te

    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=recipe, amax_reduction_group=group)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=group)


def amax_reduction_group():
    """megatron's group for FP8 amax reductions (TP x DP of this pipeline stage), None when model
    parallel is not initialised."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None
    return ps.get_amax_reduction_group(with_context_parallel=True)


class Fp8Context:
    """Callable giving a fresh FP8 autocast context for one forward (teacher + student)."""

    def __init__(self, settings: Fp8Settings):
        self.settings = settings
        self.recipe = make_recipe(settings)
        self.group = amax_reduction_group()

    def __call__(self):
        return autocast(self.recipe, self.group)


def reset_weight_cache(module) -> int:
    """Make megatron's TE linears re-cast (and re-cache) their FP8 weights at their next forward;
    returns how many modules were reset."""
    n = 0
    for m in module.modules():
        if hasattr(m, "is_first_microbatch"):
            m.is_first_microbatch = True
            n += 1
    return n
