"""The official VAR-d20 ImageNet recipe (see imagenet.py for the table).

    python scripts/train.py --config=configs/imagenet_d20.py --workdir=WORKDIR --stage=var \
        --config.data.root=/data/imagenet --config.var.tokenizer_workdir=TOKENIZER_WORKDIR
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import imagenet  # noqa: E402


def get_config(arg: str | None = None):
    del arg
    return imagenet.get_config("d20")
