"""Read Megatron-LM's `common.pt` with an exact allow-list: nothing else is ever unpickled."""
from __future__ import annotations

import _compat_pickle
import enum
import pickle
import sys
import types
from pathlib import Path
from typing import Any

import torch

from megaslim.errors import MegaslimError

# What Megatron-LM's save_checkpoint puts in common.pt (args Namespace, iteration, checkpoint_version, the
# optimizer's and scheduler's plain parts) and how torch pickles tensors and Python's plain containers.
_EXACT = frozenset({
    ("argparse", "Namespace"), ("types", "SimpleNamespace"), ("pathlib", "PosixPath"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("builtins", "complex"), ("_codecs", "encode"),  # protocol 2 writes bytes as _codecs.encode(str)
    ("torch", "Size"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
})
# Modules whose Enum classes Megatron-LM stores in its args (ModelType, AttnBackend, CudaGraphScope, the rerun
# machine's states, StrictHandling; --exit-signal is a signal.Signals); resolved only once already imported.
_ENUM_MODULES = ("signal", "megatron.")


class _CommonUnpickler(pickle.Unpickler):
    """find_class refuses everything outside the allow-list, naming it; nothing is imported for a refused name."""

    def find_class(self, module: str, name: str) -> Any:
        # torch writes protocol 2, which names Python 2 modules (__builtin__.set); map them as pickle does
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _EXACT:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith(_ENUM_MODULES) and module in sys.modules:
            obj = getattr(sys.modules[module], name, None)
            if isinstance(obj, type) and issubclass(obj, enum.Enum):
                return obj
        raise pickle.UnpicklingError(f"{module}.{name}")


# torch.load takes a pickle "module": only its Unpickler (subclassed by torch for tensor storages) and load.
_RESTRICTED = types.SimpleNamespace(Unpickler=_CommonUnpickler, load=None, __name__=__name__)


def read_common(path: str | Path) -> dict:
    """common.pt as a dict; a refused type is one MegaslimError line naming it."""
    import megatron.core  # noqa: F401 - imports (registers) the enum modules Megatron-LM's args refer to

    path = Path(path)
    try:
        # weights_only=False only because torch refuses a custom pickle module otherwise: the restriction
        # is _CommonUnpickler.find_class, stricter than torch's weights_only list (which megatron extends)
        state = torch.load(path, map_location="cpu", pickle_module=_RESTRICTED, weights_only=False)
    except pickle.UnpicklingError as err:
        raise MegaslimError(f"{path}: refusing to unpickle {err} (not a type Megatron-LM writes in "
                            "common.pt; the file was not loaded)") from None
    except FileNotFoundError:
        raise MegaslimError(f"{path} is missing") from None
    except Exception as err:  # noqa: BLE001 - torch raises anything on a corrupt zip
        raise MegaslimError(f"{path} is unreadable ({type(err).__name__}: {str(err).splitlines()[0][:160]})") \
            from None
    if not isinstance(state, dict):
        raise MegaslimError(f"{path}: expected a dict, found {type(state).__name__}")
    return state
