"""Tokenize text/JSONL corpora into megatron indexed datasets (PREFIX.bin + PREFIX.idx).

python launch/preprocess_data.py [--config CONFIG] [key.sub=value ...] [--workers N] [--overwrite]
    data.train_path -> <output_dir>/train, data.eval_path -> <output_dir>/valid (unset: the
    default corpus splits); point data.* at the written prefixes afterwards.
python launch/preprocess_data.py --input FILE --output-prefix PREFIX [...]   one file only
The tokenizer is model.tokenizer, else the one of model.load. Writes <output_dir>/preprocess.json.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from megaslim.commands import preprocess_data  # noqa: E402
from megaslim.runtime import main_guard  # noqa: E402

if __name__ == "__main__":
    main_guard(preprocess_data.main)
