"""Start-up of the TensorRT-LLM adapter: what the host offers, the ExecutorConfig, and agreement
across ranks so that a refusal on one rank stops every rank with the same message.

In TensorRT-LLM's leader mode every MPI rank constructs an Executor on its own rank{r}.engine and
the constructors meet in collectives: a rank that gave up alone would leave the others waiting
forever. So each rank validates first, the ranks exchange their verdicts (MPI allgather), and all
raise together; a failure inside the constructors themselves aborts the MPI world.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from shard.engine.base import EngineConfigError
from shard.engine.types import EngineInfo, EngineKind
from shard.trtllm.discovery import EngineLocation, find_engine_dir
from shard.trtllm.limits import check_caps
from shard.trtllm.mapping import SpecialIds, read_special_ids
from shard.trtllm.validate import EngineConfig, validate_engine

log = logging.getLogger(__name__)

Allgather = Callable[[Any], Sequence[Any]]
Abort = Callable[[str], NoReturn]


@dataclass(frozen=True)
class HostFacts:
    trtllm: Any  # the tensorrt_llm.bindings.executor module; None when TensorRT-LLM is not installed
    trtllm_version: str | None
    compute_capability: tuple[int, int] | None  # None: no CUDA device visible to torch
    gpu_name: str | None


def import_trtllm() -> tuple[Any, str | None]:
    """(tensorrt_llm.bindings.executor, tensorrt_llm.__version__), or (None, None) when absent."""
    try:
        import tensorrt_llm
        from tensorrt_llm.bindings import executor
    except ImportError as e:
        log.info("tensorrt_llm is not importable: %s", e)
        return None, None
    return executor, str(getattr(tensorrt_llm, "__version__", ""))


def gpu_facts(device: Any) -> tuple[tuple[int, int] | None, str | None]:
    """(compute capability, name) of the rank's CUDA device, or (None, None) without one."""
    try:
        import torch
    except ImportError:
        return None, None
    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None, None
    major, minor = torch.cuda.get_device_capability(device)
    return (int(major), int(minor)), str(torch.cuda.get_device_name(device))


def detect_host(device: Any) -> HostFacts:
    trtllm, version = import_trtllm()
    cc, name = gpu_facts(device)
    return HostFacts(trtllm=trtllm, trtllm_version=version, compute_capability=cc, gpu_name=name)


def mpi_allgather(value: Any) -> Sequence[Any]:
    from mpi4py import MPI

    return MPI.COMM_WORLD.allgather(value)


def mpi_abort(message: str) -> NoReturn:
    """Ends every rank: a rank stuck in a TensorRT-LLM collective cannot be reached any other way."""
    log.critical("%s; aborting the MPI world", message)
    sys.stderr.flush()
    from mpi4py import MPI

    MPI.COMM_WORLD.Abort(1)
    raise SystemExit(1)  # Abort does not return; this satisfies the type checker


def agree(local_error: str | None, allgather: Allgather | None) -> None:
    """Raises EngineConfigError on every rank when any rank refused (the message names the ranks)."""
    if allgather is None:  # a world of one
        if local_error:
            raise EngineConfigError(local_error)
        return
    by_message: dict[str, list[int]] = {}
    for rank, error in enumerate(allgather(local_error)):
        if error:
            by_message.setdefault(error, []).append(rank)
    if by_message:
        raise EngineConfigError(
            "; ".join(f"rank {','.join(map(str, ranks))}: {msg}" for msg, ranks in by_message.items())
        )


@dataclass(frozen=True)
class CheckedEngine:
    location: EngineLocation
    engine: EngineConfig
    special: SpecialIds


def check_engine(
    *,
    model_id: str,
    tokenizer_name: str,
    caps: tuple[int, int, int],
    world_size: int,
    host: HostFacts,
    allgather: Allgather | None,
) -> CheckedEngine:
    """Every check before loading, on every rank; raises the same EngineConfigError on all ranks
    when any rank refused. caps = the launcher's (max_batch_size, max_input_tokens, max_total_tokens)."""
    local_error, checked = None, None
    try:
        location = find_engine_dir(model_id, gpu_name=host.gpu_name)
        engine = validate_engine(
            location.engine_dir,
            installed_version=host.trtllm_version,
            world_size=world_size,
            device_cc=host.compute_capability,
            gpu_name=host.gpu_name,
        )
        check_caps(engine.limits, max_batch_size=caps[0], max_input_tokens=caps[1], max_total_tokens=caps[2])
        checked = CheckedEngine(location, engine, read_special_ids(location, tokenizer_name))
    except EngineConfigError as e:
        local_error = str(e)
    except Exception as e:  # still shared: the other ranks must not wait for this one
        log.exception("validating %s failed", model_id)
        local_error = f"validating {model_id} failed: {type(e).__name__}: {e}"
    agree(local_error, allgather)
    assert checked is not None  # agree() raised otherwise
    return checked


def executor_config(
    trtllm: Any, engine: EngineConfig, *, kv_cache_fraction: float, max_batch_size: int,
    scheduler_policy: str = "auto",
) -> tuple[Any, bool]:
    """The ExecutorConfig (leader mode over MPI) and whether KV block reuse is on. scheduler_policy
    (--scheduler-policy): max_utilization or guaranteed_no_evict; auto keeps GUARANTEED_NO_EVICT,
    TensorRT-LLM's own default.

    Every setting whose default changed between 0.16 and 1.2 is set explicitly. Block reuse needs
    an engine built with paged context FMHA (trtllm-build --use_paged_context_fmha enable); the
    router does no prefix caching for this engine, so TensorRT-LLM's reuse is the only one.
    """
    reuse = engine.limits.chunked_context  # both need use_paged_context_fmha
    if not reuse:
        log.info("KV block reuse off: the engine was built without use_paged_context_fmha")
    kv = trtllm.KvCacheConfig(free_gpu_memory_fraction=kv_cache_fraction, enable_block_reuse=reuse)
    policies = trtllm.CapacitySchedulerPolicy
    policy = policies.MAX_UTILIZATION if scheduler_policy == "max_utilization" else policies.GUARANTEED_NO_EVICT
    config = trtllm.ExecutorConfig(
        max_beam_width=1,
        scheduler_config=trtllm.SchedulerConfig(policy),
        kv_cache_config=kv,
        enable_chunked_context=engine.limits.chunked_context,
    )
    config.parallel_config = trtllm.ParallelConfig(
        trtllm.CommunicationType.MPI, trtllm.CommunicationMode.LEADER
    )
    if max_batch_size:
        config.max_batch_size = min(max_batch_size, engine.limits.max_batch_size)
    return config, reuse


def refuse(message: str, abort: Abort | None) -> NoReturn:
    """Aborts the MPI world (several ranks, some may sit in a collective) or raises (one rank)."""
    if abort is not None:
        abort(message)
    raise EngineConfigError(message)


def construct_executor(
    trtllm: Any,
    engine: EngineConfig,
    *,
    kv_cache_fraction: float,
    max_batch_size: int,
    version: str | None,
    abort: Abort | None,
    scheduler_policy: str = "auto",
) -> tuple[Any, bool]:
    """(Executor, block reuse on); a failure here refuses with advice on every rank."""
    try:
        config, reuse = executor_config(
            trtllm, engine, kv_cache_fraction=kv_cache_fraction, max_batch_size=max_batch_size,
            scheduler_policy=scheduler_policy,
        )
        return trtllm.Executor(str(engine.engine_dir), trtllm.ModelType.DECODER_ONLY, config), reuse
    except Exception as e:
        refuse(
            f"TensorRT-LLM could not load {engine.engine_dir}: {type(e).__name__}: {e}. If TensorRT reports an "
            f"incompatible device or version, rebuild the engine on this GPU with TensorRT-LLM {version} "
            "(docs/deploy.md)",
            abort,
        )


def engine_info(
    *,
    model_id: str,
    engine: EngineConfig,
    eos_token_ids: tuple[int, ...],
    version: str,
    caps: tuple[int, int, int],
) -> EngineInfo:
    """Info for the router; caps = the launcher's (max_batch_size, max_input_tokens, max_total_tokens), 0 = none."""
    limits = engine.limits

    def capped(cap: int, limit: int) -> int:
        return min(cap, limit) if cap else limit

    return EngineInfo(
        model_id=model_id,
        dtype=engine.dtype,
        device_type="cuda",
        world_size=engine.world_size,
        tp_size=engine.tp_size,
        pp_size=engine.pp_size,
        engine=EngineKind.TRTLLM,
        block_size=0,
        manages_kv_cache=True,
        vocab_size=engine.vocab_size,
        eos_token_ids=eos_token_ids,
        max_batch_size=capped(caps[0], limits.max_batch_size),
        max_input_tokens=capped(caps[1], limits.max_input_tokens),
        max_total_tokens=capped(caps[2], limits.max_total_tokens),
        max_batch_prefill_tokens=limits.max_batch_prefill_tokens,
        # The Executor runs with beam width 1 whatever the engine allows: the router has no beam search.
        max_beam_width=1,
        supports_prefix_caching=False,
        supports_prefill_logprobs=False,
        max_top_n_tokens=0,  # the Executor returns the chosen token's logprob only
        unsupported_parameters=("typical_p",),  # SamplingConfig has no typical-p filter
        engine_version=version,
    )
