"""oneDNN-prepacked linears (shard/native/cpu_linear.py): same results as F.linear, weights freed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shard.native.cpu_linear import pack_linears, packing_available
from shard.native.loader import DummySource, build_sharded_model, load_weights
from shard.native.model import Linear
from shard.native.tp import TPGroup
from tests.native_helpers import tiny_config

pytestmark = pytest.mark.skipif(
    not packing_available(torch.device("cpu"), torch.float32), reason="torch built without oneDNN"
)


@pytest.mark.parametrize("rows", [1, 3, 16, 70])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    lin = Linear(96, 160, bias=bias)
    with torch.no_grad():
        lin.weight.normal_()
        if bias:
            lin.bias.normal_()
    x = torch.randn(rows, 96)
    want = F.linear(x, lin.weight, lin.bias)
    parent = torch.nn.Sequential(lin)
    assert pack_linears(parent) == 1
    assert lin.weight.numel() == 0  # freed: the packed copy is all it reads now
    with torch.inference_mode():
        got = lin(x)
        strided = lin(torch.randn(rows, 2 * 96)[:, ::2])  # non-contiguous rows are accepted too
    assert strided.shape == (rows, 160)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert pack_linears(parent) == 0  # idempotent


def test_whole_model_logits_unchanged_and_tied_embedding_kept() -> None:
    config = tiny_config(tie_word_embeddings=True)
    model = build_sharded_model(config, dtype=torch.float32, device=torch.device("cpu"), tp=TPGroup.single())
    load_weights(model, DummySource(config, seed=1, device=torch.device("cpu")), TPGroup.single())
    x = torch.randn(5, config.hidden_size)
    head = model.lm_head
    with torch.inference_mode():
        want = head(x)
    n = pack_linears(model)
    assert n == 2 * config.num_layers + 2 * config.num_layers + 1  # qkv, o, gate_up, down, head
    assert model.embed_tokens.weight.numel() == config.vocab_size * config.hidden_size  # shared, so kept
    with torch.inference_mode():
        torch.testing.assert_close(head(x), want, rtol=1e-5, atol=1e-4)
