"""`python -m dora_dist.train` in which only rank $FAIL_RANK meets bad input (its data), after the process group
exists: the other rank goes on into the model's collectives. Launched by test_bad_inputs_launch.py under torchrun."""

import os
import sys

import dora_dist.errors as errors
import dora_dist.train as train
from dora_dist.errors import DataError

errors.OTHER_RANK_GRACE_S = 2.0  # rank 0 does not fail here: the failing rank 1 need not wait the full grace

_real = train.build_datasets


def _build_datasets(cfg, tokenizer, env=None):
    if env is not None and env.rank == int(os.environ["FAIL_RANK"]):
        raise DataError(f"data.source: rank {env.rank} cannot read its data (a test's failure)")
    return _real(cfg, tokenizer, env)


train.build_datasets = _build_datasets
sys.exit(train.main(sys.argv[1:]))
