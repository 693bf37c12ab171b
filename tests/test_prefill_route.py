"""Which attention kernel a step takes, decided on the host: ForwardBatch.no_prefix as the batch
builders set it (and as the engine's steps carry it to the backend), and TritonAttention's routing
between the dense SDPA (one sequence or several of equal length), FA2 varlen (opt-in) and paged
Triton prefill kernels. Runs on the CPU: the kernels are replaced by recorders, the route is what
is checked (tests/test_kernels_gpu.py checks the kernels' numbers on a GPU)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from shard.engine.types import NewRequest, SamplingParams, StoppingParams, WarmupSpec
from shard.native.attention import AttentionBackend
from shard.native.batch import DecodeBatch, build_prefill
from shard.native.cuda_graphs import StaticDecodeInputs
from shard.native.engine import NativeEngine, RuntimeOptions
from shard.native.forward import AttentionMetadata, ForwardBatch
from shard.native.kernels import triton_attention as ta
from shard.native.kernels.dense_plans import DensePlans
from shard.native.loader import load_model
from shard.native.tp import TPGroup
from tests.native_helpers import perturbed_state_dict, save_hf_model, tiny_config

CPU = torch.device("cpu")
BS = 4


def prefill(news: list[int], prefixes: list[int], *, num_decode: int = 0) -> ForwardBatch:
    """A prefill batch of len(news) sequences with enough scattered blocks each."""
    tables, nxt = [], 0
    for n, pre in zip(news, prefixes, strict=True):
        count = -(-(n + pre) // BS)
        tables.append(list(range(nxt + count - 1, nxt - 1, -1)))
        nxt += count
    return build_prefill(
        new_tokens=[[7] * n for n in news], prefix_lens=prefixes, block_tables=tables,
        all_logits=[False] * len(news), block_size=BS, device=CPU, num_decode=num_decode,
    )  # fmt: skip


# ---------------------------------------------------------------- no_prefix from the builders
def test_fresh_prefills_have_no_prefix_and_the_metadata_carries_it() -> None:
    for news in ([5], [5, 1, 9], [1] * 16):
        batch = prefill(news, [0] * len(news))
        assert batch.no_prefix is True, news
        assert AttentionMetadata.from_batch(batch).no_prefix is True
        # the lengths it stands for: every sequence's keys are its new tokens
        assert batch.seq_lens.tolist() == news and batch.max_seqlen_k == batch.max_seqlen_q


@pytest.mark.parametrize(
    "news, prefixes, num_decode",
    [
        ([5], [8], 0),  # a prefix-cache hit
        ([5, 3, 9], [0, 4, 0], 0),  # one hit among fresh sequences
        ([4], [12], 0),  # a later chunk of a chunked prompt
        ([1, 1, 6], [9, 3, 0], 2),  # mixed: decode rows then a fresh prompt
        ([1, 6], [0, 0], 1),  # mixed: the decode rows alone clear it
    ],
)
def test_any_prefix_or_decode_row_clears_no_prefix(
    news: list[int], prefixes: list[int], num_decode: int
) -> None:
    batch = prefill(news, prefixes, num_decode=num_decode)
    assert batch.no_prefix is False
    assert AttentionMetadata.from_batch(batch).no_prefix is False


@pytest.mark.parametrize(
    "news, prefixes, num_decode, want",
    [
        ([1, 1, 6], [9, 3, 0], 2, 6),  # decode rows, then one fresh prompt
        ([1, 7, 7, 7], [5, 0, 0, 0], 1, 7),  # fresh prompts of one length
        ([1, 7, 6], [5, 0, 0], 1, 0),  # of two lengths
        ([1, 7, 7], [5, 0, 3], 1, 0),  # one with a cached prefix (or an earlier chunk)
        ([7, 7], [0, 0], 0, 0),  # no decode rows: no_prefix and the lengths say it
        ([1, 1], [5, 9], 2, 0),  # decode rows only
    ],
)
def test_mixed_batches_say_when_their_prompts_are_fresh_and_equal(
    news: list[int], prefixes: list[int], num_decode: int, want: int
) -> None:
    batch = prefill(news, prefixes, num_decode=num_decode)
    assert batch.fresh_equal_len == want
    assert AttentionMetadata.from_batch(batch).fresh_equal_len == want


def test_decode_batches_never_claim_no_prefix() -> None:
    db = DecodeBatch(
        last_tokens=[3, 4], kv_lens=[0, 5], block_tables=[[1], [2, 3]], block_size=BS, device=CPU
    )
    assert db.forward_batch().no_prefix is False
    static = StaticDecodeInputs(
        max_batch_size=4, max_blocks_per_seq=2, block_size=BS, scratch_slot=40, device=CPU
    )
    assert static.view(4).no_prefix is False
    assert AttentionMetadata.from_batch(static.view(4)).no_prefix is False


# ---------------------------------------------------------------- the route
def meta_of(batch: ForwardBatch) -> AttentionMetadata:
    return AttentionMetadata.from_batch(batch)


@pytest.mark.parametrize(
    "news, prefixes, fused_ok, dense, varlen, want",
    [
        ([9], [0], False, True, False, "dense"),  # one fresh sequence keeps SDPA, fp32 included
        ([9], [0], True, True, False, "dense"),
        ([9], [0], True, False, True, "varlen_flash"),
        ([9], [0], True, False, False, "paged"),
        ([9, 9, 9], [0, 0, 0], True, True, False, "dense"),  # equal lengths: (B, H, L, D) views
        ([1] * 16, [0] * 16, True, True, False, "dense"),
        ([9, 9, 9], [0, 0, 0], False, True, True, "paged"),  # fp32: SDPA would take its math kernel
        ([9, 4, 1], [0, 0, 0], True, True, False, "paged"),  # uneven: the paged kernel by default
        ([9, 4, 1], [0, 0, 0], True, True, True, "varlen_flash"),  # ... or FA2 varlen, opted in
        ([9, 4, 1], [0, 0, 0], False, True, True, "paged"),  # FA2 has no fp32
        ([9, 9], [0, 8], True, True, True, "paged"),  # a prefix-cache hit reads the cache
        ([9], [8], True, True, True, "paged"),
    ],
)
def test_prefill_route(
    news: list[int], prefixes: list[int], fused_ok: bool, dense: bool, varlen: bool, want: str
) -> None:
    batch = prefill(news, prefixes)
    got = ta.prefill_route(
        meta_of(batch),
        num_tokens=batch.num_tokens,
        fused_ok=fused_ok,
        dense_prefill=dense,
        varlen_flash=varlen,
    )
    assert got == want


def test_prefill_route_ignores_no_prefix_outside_prefills() -> None:
    """Hand-built metadata claiming no_prefix on a decode or mixed call takes neither SDPA nor FA2."""
    batch = prefill([1, 1, 1], [0, 0, 0])
    for change in ({"num_decode": 2}, {"is_prefill": False}):
        meta = AttentionMetadata(**{**meta_of(batch).__dict__, **change})
        assert (
            ta.prefill_route(meta, num_tokens=3, fused_ok=True, dense_prefill=True, varlen_flash=True)
            == "paged"
        )


def test_fused_attention_needs_cuda_and_16_bit() -> None:
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert ta._fused_attention_ok(torch.zeros((3, 4, 64), dtype=dtype)) is False  # CPU tensors


class Recorder:
    """Stands in for the kernels TritonAttention.forward may call; records which and with what."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, fused_ok: bool) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []
        monkeypatch.setattr(ta, "store_kv", lambda *a: self.calls.append(("store_kv", a, {})))
        monkeypatch.setattr(ta, "_fused_attention_ok", lambda q: fused_ok)
        for name in ("dense_causal_prefill", "varlen_causal_prefill", "paged_prefill_attention",
                     "paged_decode_attention"):  # fmt: skip
            monkeypatch.setattr(ta, name, self._kernel(name))

    def _kernel(self, name: str) -> Callable[..., torch.Tensor]:
        def run(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            self.calls.append((name, args, kwargs))
            out = kwargs.get("out")
            return torch.zeros_like(q) if out is None else out

        return run

    def kernels(self) -> list[str]:
        return [name for name, _, _ in self.calls if name != "store_kv"]


def forward(backend: ta.TritonAttention, batch: ForwardBatch) -> None:
    t, hq, hkv, d = batch.num_tokens, 4, 2, 16
    q, k, v = torch.zeros((t, hq, d)), torch.zeros((t, hkv, d)), torch.zeros((t, hkv, d))
    cache = torch.zeros((32, BS, hkv, d))
    backend.forward(q, k, v, cache, cache, meta_of(batch), 0.25)


def test_backend_sends_fresh_equal_length_prefills_to_batched_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(monkeypatch, fused_ok=True)
    forward(ta.TritonAttention(cudnn_build_ms=0), prefill([9, 9, 9, 9], [0] * 4))
    assert [name for name, _, _ in rec.calls] == ["store_kv", "dense_causal_prefill"]
    (k, v, scale), kwargs = rec.calls[1][1:]
    assert kwargs == {"num_seqs": 4} and scale == 0.25
    assert k.shape == (36, 2, 16) and v.shape == (36, 2, 16)


def test_backend_gives_a_mixed_batchs_fresh_equal_prompts_their_own_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The dense route of a mixed batch sees only the prompts' rows, as (sequences, length) views."""
    rec = Recorder(monkeypatch, fused_ok=True)
    forward(ta.TritonAttention(cudnn_build_ms=0), prefill([1, 1, 5, 5, 5], [9, 3, 0, 0, 0], num_decode=2))
    names = [name for name, _, _ in rec.calls]
    assert names == ["store_kv", "paged_decode_attention", "dense_causal_prefill"]
    (k, v, scale), kwargs = rec.calls[2][1:]
    assert kwargs == {"num_seqs": 3} and scale == 0.25
    assert k.shape == (15, 2, 16) and v.shape == (15, 2, 16)


def test_backend_sends_fresh_uneven_prefills_to_varlen_flash_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec = Recorder(monkeypatch, fused_ok=True)
    batch = prefill([9, 4, 1], [0, 0, 0])
    forward(ta.TritonAttention(varlen_flash=True), batch)
    assert [name for name, _, _ in rec.calls] == ["store_kv", "varlen_causal_prefill"]
    k, v, cu, max_seqlen, scale = rec.calls[1][1]
    assert cu is batch.cu_seqlens_q and cu.dtype == torch.int32 and cu.tolist() == [0, 9, 13, 14]
    assert max_seqlen == 9 and scale == 0.25
    assert k.shape == (14, 2, 16) and v.shape == (14, 2, 16)


@pytest.mark.parametrize(
    "news, prefixes, num_decode, fused_ok, backend_kw, want",
    [
        ([9], [0], 0, True, {}, "dense_causal_prefill"),  # one sequence: SDPA as before
        ([9], [0], 0, False, {}, "dense_causal_prefill"),  # ... in fp32 too
        ([9, 9], [0, 0], 0, False, {}, "paged_prefill_attention"),  # fp32: no batched SDPA
        ([9, 9], [0, 0], 0, True, {"dense_prefill": False}, "paged_prefill_attention"),
        ([9, 4, 1], [0, 0, 0], 0, True, {}, "paged_prefill_attention"),  # uneven, FA2 not asked for
        ([9, 4, 1], [0, 0, 0], 0, False, {"varlen_flash": True}, "paged_prefill_attention"),  # fp32
        ([9, 9], [0, 8], 0, True, {"varlen_flash": True}, "paged_prefill_attention"),  # a prefix hit
        ([1, 1, 6], [9, 3, 2], 2, True, {}, "paged_decode_attention+paged_prefill_attention"),  # mixed
        ([1, 6, 5], [9, 0, 0], 1, True, {}, "paged_decode_attention+paged_prefill_attention"),  # uneven
        # mixed with fresh prompts of one length: SDPA for them, unless fp32 or dense_prefill off
        ([1, 1, 6, 6], [9, 3, 0, 0], 2, True, {}, "paged_decode_attention+dense_causal_prefill"),
        ([1, 1, 6, 6], [9, 3, 0, 0], 2, False, {}, "paged_decode_attention+paged_prefill_attention"),
        ([1, 6], [9, 0], 1, True, {"dense_prefill": False}, "paged_decode_attention+paged_prefill_attention"),
    ],
)
def test_backend_keeps_other_prefills_on_their_kernels(
    monkeypatch: pytest.MonkeyPatch, news: list[int], prefixes: list[int], num_decode: int, fused_ok: bool,
    backend_kw: dict, want: str,
) -> None:  # fmt: skip
    rec = Recorder(monkeypatch, fused_ok=fused_ok)
    forward(
        ta.TritonAttention(**{"cudnn_build_ms": 0} | backend_kw),
        prefill(news, prefixes, num_decode=num_decode),
    )
    assert "+".join(rec.kernels()) == want


# ---------------------------------------------------------------- cuDNN's per-shape builds
def test_dense_plans_rent_until_the_losses_pay_for_a_build() -> None:
    plans = DensePlans(build_ms=65.0)
    per_layer_us = 8 * 2048 * (0.006 + 9.2e-6 * 2048)  # what the model says 8 x 2,048 loses a layer
    calls = 0
    while not plans.ready(8, 2048):
        calls += 1
        for _ in range(32):  # one call of a 32-layer model
            plans.rent(8, 2048)
    assert calls == math.ceil(65e3 / (32 * per_layer_us)) == 5  # ready from the sixth call
    assert not plans.ready(2048, 8) and not plans.ready(8, 2047)  # the shape, not its token count
    assert (8, 2048) not in plans.lost_us  # the ledger forgets what it built
    for _ in range(32):
        plans.rent(64, 128)
    assert not plans.ready(64, 128) and 0 < plans.lost_us[(64, 128)] < 65e3


def test_dense_plans_build_at_once_when_told_and_read_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert DensePlans(build_ms=0).ready(3, 17)
    monkeypatch.setenv("SHARD_CUDNN_BUILD_MS", "0")
    assert DensePlans().ready(3, 17)
    monkeypatch.setenv("SHARD_CUDNN_BUILD_MS", "1")
    plans = DensePlans()
    assert not plans.ready(1, 1000)
    plans.rent(1, 1000)  # 1,000 x (0.006 + 0.0092) = 15.2 us: not yet 1 ms
    assert not plans.ready(1, 1000)
    for _ in range(65):
        plans.rent(1, 1000)
    assert plans.ready(1, 1000)
    assert DensePlans(build_ms=65).build_us == 65e3
    with pytest.raises(ValueError, match="build_ms"):
        DensePlans(build_ms=-1)
    for bad in ("fast", "nan", "-5"):
        monkeypatch.setenv("SHARD_CUDNN_BUILD_MS", bad)
        with pytest.raises(ValueError, match="SHARD_CUDNN_BUILD_MS"):
            DensePlans()


def test_dense_plans_eager_builds_what_it_meets_and_keeps_it() -> None:
    plans = DensePlans(build_ms=65)
    with plans.eager():
        assert plans.ready(4, 100) and plans.ready(1, 1024)
    assert plans.ready(4, 100) and plans.ready(1, 1024)  # built during warmup, still built
    assert not plans.ready(4, 101)  # eager only inside the block


def test_warmup_builds_its_dense_shapes_eagerly_when_the_backend_has_plans() -> None:
    from types import SimpleNamespace

    from shard.native.memory import _eager_dense_builds

    backend = ta.TritonAttention()
    layer = SimpleNamespace(self_attn=SimpleNamespace(backend=backend))
    engine = SimpleNamespace(model=SimpleNamespace(layers=[layer, layer]))
    with _eager_dense_builds(engine):
        assert backend.dense_plans.ready(16, 1)
    assert backend.dense_plans.ready(16, 1) and not backend.dense_plans.ready(16, 2)
    other = SimpleNamespace(model=SimpleNamespace(layers=[SimpleNamespace(self_attn=SimpleNamespace(backend=object()))]))
    with _eager_dense_builds(other):  # the reference backend: nothing to build
        pass
    with _eager_dense_builds(SimpleNamespace(model=SimpleNamespace(layers=[]))):  # a stage without layers
        pass


def test_dense_plans_ledger_is_bounded() -> None:
    plans = DensePlans(build_ms=1e9)
    for length in range(1, 5000):
        plans.rent(1, length)
    assert 0 < len(plans.lost_us) <= 4096


@pytest.mark.parametrize("mixed", [False, True])
def test_backend_keeps_a_new_shape_on_the_paged_kernel_until_cudnn_pays(
    monkeypatch: pytest.MonkeyPatch, mixed: bool
) -> None:
    """A fresh equal-length shape cuDNN has no graph for takes the paged kernel in every layer of
    a step, each layer booking its loss; the step after the losses reach the build's cost takes
    SDPA in every layer. Another shape starts over; fp32 (no cuDNN there) never waits."""
    rec = Recorder(monkeypatch, fused_ok=True)
    backend = ta.TritonAttention(cudnn_build_ms=0.05)  # 50 us: 8 x 9 tokens lose ~0.44 us a layer
    num_decode = 2 if mixed else 0
    batch = prefill([1] * num_decode + [9] * 8, [9, 3][:num_decode] + [0] * 8, num_decode=num_decode)
    prompts = "paged_decode_attention+" if mixed else ""
    steps = []
    for _ in range(20):
        rec.calls.clear()
        meta = meta_of(batch)  # a new step
        for _ in range(8):  # its layers share the metadata
            t, hq, hkv, d = batch.num_tokens, 4, 2, 16
            q, k, v = torch.zeros((t, hq, d)), torch.zeros((t, hkv, d)), torch.zeros((t, hkv, d))
            cache = torch.zeros((64, BS, hkv, d))
            backend.forward(q, k, v, cache, cache, meta, 0.25)
        kernels = rec.kernels()
        per_layer = len(kernels) // 8
        assert kernels == kernels[:per_layer] * 8, "every layer of a step takes the same kernel"
        steps.append("+".join(kernels[:per_layer]))
    paged, dense = prompts + "paged_prefill_attention", prompts + "dense_causal_prefill"
    n = steps.index(dense)
    per_layer_us = 72 * (0.006 + 9.2e-6 * 9)
    assert n == math.ceil(50 / (8 * per_layer_us)) and steps == [paged] * n + [dense] * (20 - n)
    rec.calls.clear()
    forward(
        backend, prefill([1] * num_decode + [9] * 7, [9, 3][:num_decode] + [0] * 7, num_decode=num_decode)
    )
    assert "+".join(rec.kernels()) == paged  # 7 x 9 is a shape of its own

    fp32 = Recorder(monkeypatch, fused_ok=False)
    forward(ta.TritonAttention(), prefill([9], [0]))
    assert fp32.kernels() == ["dense_causal_prefill"]  # one fp32 sequence: SDPA's math kernel, no build


def test_backend_sends_a_new_shape_to_varlen_flash_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(monkeypatch, fused_ok=True)
    forward(ta.TritonAttention(varlen_flash=True), prefill([9, 9], [0, 0]))
    assert rec.kernels() == ["varlen_causal_prefill"]


# ---------------------------------------------------------------- the engine's steps
class MetaSpy:
    """Wraps the model's attention backend; records each step's routing facts once (every layer
    sees the same metadata object)."""

    def __init__(self, inner: AttentionBackend) -> None:
        self.inner = inner
        self.steps: list[tuple[bool, int, bool]] = []  # (is_prefill, num_decode, no_prefix)
        self._last: AttentionMetadata | None = None

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        # One record per forward (every layer shares its metadata). Holding the object, not its
        # id(): a freed metadata's id can come back for the next forward's (a CI run missed a step so).
        if meta is not self._last:
            self._last = meta
            self.steps.append((meta.is_prefill, meta.num_decode, meta.no_prefix))
        return self.inner.forward(q, k, v, k_cache, v_cache, meta, scale)


@pytest.fixture(scope="module")
def engine_and_spy(tmp_path_factory: pytest.TempPathFactory) -> tuple[NativeEngine, MetaSpy]:
    config = tiny_config(eos_token_id=299)
    folder = tmp_path_factory.mktemp("tiny-route")
    save_hf_model(config, perturbed_state_dict(config, seed=3), folder)
    model, mc = load_model(str(folder), dtype=torch.float32, device=CPU, tp=TPGroup.single())
    spy = MetaSpy(model.layers[0].self_attn.backend)
    model.set_attention_backend(spy)
    eng = NativeEngine(
        model=model, model_config=mc, device=CPU, dtype=torch.float32,
        options=RuntimeOptions(model_id="tiny", block_size=BS, kv_cache_tokens=4 * 256),
    )  # fmt: skip
    eng.warmup(
        WarmupSpec(max_input_tokens=100, max_total_tokens=200, max_batch_prefill_tokens=400, max_batch_size=8)
    )
    return eng, spy


def request(rid: int, prompt: list[int], blocks: list[int], *, prefix_len: int = 0) -> NewRequest:
    return NewRequest(
        id=rid, input_ids=tuple(prompt), sampling=SamplingParams(), blocks=tuple(blocks), prefix_len=prefix_len,
        stopping=StoppingParams(max_new_tokens=3, ignore_eos_token=True),
    )  # fmt: skip


def test_engine_steps_carry_no_prefix_to_the_backend(engine_and_spy: tuple[NativeEngine, MetaSpy]) -> None:
    """Fresh prompts prefill with no_prefix; a prefix-cache hit, a mixed prefill and decode steps
    without it."""
    eng, spy = engine_and_spy
    spy.steps.clear()
    a, b = list(range(3, 16)), list(range(20, 29))
    eng.prefill([request(1, a, list(range(0, 5))), request(2, b, list(range(5, 9)))])
    assert spy.steps == [(True, 0, True)]
    eng.decode({}, 1)
    assert spy.steps[-1] == (False, 0, False)
    eng.prefill([request(3, list(range(40, 51)), list(range(20, 24)))], decode_running={})
    assert spy.steps[-1] == (True, 2, False)  # mixed: requests 1 and 2 ride along
    while eng.seqs:
        eng.decode({}, 1)
    d = a[:8] + [50]  # shares request 1's first two full blocks, which still hold its K/V
    eng.prefill([request(4, d, [0, 1, 24, 25], prefix_len=8)])
    assert spy.steps[-1] == (True, 0, False)  # a prefix-cache hit


def test_dense_prefill_can_be_turned_off_from_the_environment(monkeypatch):
    from shard.native.kernels.triton_attention import TritonAttention

    assert TritonAttention().dense_prefill
    monkeypatch.setenv("SHARD_DENSE_PREFILL", "0")
    assert not TritonAttention().dense_prefill
    assert TritonAttention(dense_prefill=True).dense_prefill  # an explicit choice wins
