"""Conversion errors point at the cause: a stray key is named as unexpected, a lost key as
missing, with the architecture inferred from the keys that agree."""

import numpy as np
import pytest
from flax import nnx

from var_jax.convert import var as var_convert
from var_jax.models import construct
from var_jax.models.var import VAR, VARConfig

CONFIG = VARConfig.tiny(depth=2, width=32, patch_nums=(1, 2, 3), vocab_size=16, cvae=4,
                        num_classes=5)


@pytest.fixture(scope="module")
def state_dict():
    model = construct.abstract_model(lambda: VAR(CONFIG, rngs=nnx.Rngs(0)))
    return var_convert.var_state_dict(model)


def test_stray_key_is_named_not_reported_as_missing_blocks(state_dict):
    stray = dict(state_dict, **{"blocks.9.attn.q_bias": np.zeros(32, np.float32)})
    cfg = var_convert.infer_config(stray, patch_nums=CONFIG.patch_nums)
    assert cfg.depth == 2  # from the two complete blocks, not from the stray index
    with pytest.raises(ValueError) as err:
        var_convert.check_state_dict(cfg, stray)
    message = str(err.value)
    assert "unexpected keys: 'blocks.9.attn.q_bias'" in message
    assert "missing" not in message
    # A misspelled key: its block still counts, the right name is missing, the wrong one
    # unexpected -- both named, nothing else.
    typo = dict(state_dict)
    typo["blocks.1.attn.q_biass"] = typo.pop("blocks.1.attn.q_bias")
    cfg = var_convert.infer_config(typo, patch_nums=CONFIG.patch_nums)
    assert cfg.depth == 2
    with pytest.raises(ValueError) as err:
        var_convert.check_state_dict(cfg, typo)
    message = str(err.value)
    assert "missing keys: 'blocks.1.attn.q_bias';" in message
    assert "unexpected keys: 'blocks.1.attn.q_biass'" in message


def test_a_block_that_lost_keys_still_counts(state_dict):
    lost = {k: v for k, v in state_dict.items() if not k.startswith("blocks.1.ffn.")}
    cfg = var_convert.infer_config(lost, patch_nums=CONFIG.patch_nums)
    assert cfg.depth == 2
    with pytest.raises(ValueError, match=r"missing keys: 'blocks\.1\.ffn\.fc1\.bias'"):
        var_convert.check_state_dict(cfg, lost)
