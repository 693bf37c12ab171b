"""Router start-up and the object the HTTP app talks to.

start(): connect to the master shard, discover every rank, read Info, load the tokenizer, derive
the limits, Warmup (which sizes the KV cache), then start the scheduler. Until that has finished
`ready` is False and /health answers 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from router.arrivals import Arrivals
from router.client import ShardedClient
from router.config import RouterConfig
from router.errors import GenerationError
from router.scheduler import Scheduler
from router.tokenizer import Tokenizer, load_tokenizer
from router.types import Limits, ShardInfo

log = logging.getLogger(__name__)

DEFAULT_MAX_TOTAL_TOKENS = 4096


class StartupError(Exception):
    """Configuration and shard limits disagree; the message names the flag to change."""


def derive_limits(config: RouterConfig, info: ShardInfo) -> Limits:
    """Flags win; 0 means "take the engine's limit" (then TGI-like defaults). Engine limits cap flags."""
    engine_total = info.max_total_tokens or DEFAULT_MAX_TOTAL_TOKENS
    max_total = config.max_total_tokens or engine_total
    if info.max_total_tokens and max_total > info.max_total_tokens:
        raise StartupError(
            f"--max-total-tokens {max_total} exceeds the engine's limit {info.max_total_tokens}; lower it"
        )
    max_input = config.max_input_tokens or min(info.max_input_tokens or max_total - 1, max_total - 1)
    if info.max_input_tokens and max_input > info.max_input_tokens:
        raise StartupError(
            f"--max-input-tokens {max_input} exceeds the engine's limit {info.max_input_tokens}; lower it"
        )
    if max_input >= max_total:
        raise StartupError(f"--max-input-tokens ({max_input}) must be < --max-total-tokens ({max_total})")
    prefill = config.max_batch_prefill_tokens or (info.max_batch_prefill_tokens or max_input + 50)
    if prefill < max_input:
        raise StartupError(
            f"--max-batch-prefill-tokens ({prefill}) must be >= --max-input-tokens ({max_input})"
        )
    return Limits(
        max_input_tokens=max_input,
        max_total_tokens=max_total,
        max_batch_prefill_tokens=prefill,
        max_batch_total_tokens=config.max_batch_total_tokens or max_total * 16,
        max_best_of=config.max_best_of,
        max_stop_sequences=config.max_stop_sequences,
        # An engine reporting max_top_n_tokens 0 returns no alternatives: top_n_tokens > 0 is a 422.
        max_top_n_tokens=min(config.max_top_n_tokens, info.max_top_n_tokens),
        max_client_batch_size=config.max_client_batch_size,
        max_concurrent_requests=config.max_concurrent_requests,
        unsupported_parameters=info.unsupported_parameters,
    )


class Backend:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.info: ShardInfo | None = None
        self.limits: Limits | None = None
        self.tokenizer: Tokenizer | None = None
        self.scheduler: Scheduler | None = None
        self.arrivals = Arrivals()  # the validator counts requests in validation; the scheduler reads it
        self.client: ShardedClient | None = None
        self.ready = False
        self.startup_error: BaseException | None = None
        self._health_checked = 0.0
        self._health_ok = False

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException as e:
            self.startup_error = e
            log.error("router start-up failed: %s", e)
            raise

    async def _start(self) -> None:
        cfg = self.config
        self.client = await self._connect(cfg.master_shard_uds_path)
        info = await self.client.info()
        log.info("shards: %s", info)
        tokenizer_name = cfg.tokenizer_name or info.model_id
        self.tokenizer = await asyncio.to_thread(load_tokenizer, tokenizer_name, cfg.cache_dir or None)
        limits = derive_limits(cfg, info)
        max_batch_size = cfg.max_batch_size or info.max_batch_size or 0
        warm = await self.client.warmup(
            max_input_tokens=limits.max_input_tokens,
            max_total_tokens=limits.max_total_tokens,
            max_batch_prefill_tokens=limits.max_batch_prefill_tokens,
            max_batch_size=max_batch_size,
        )
        info = replace(
            info, num_blocks=warm.num_blocks, max_supported_total_tokens=warm.max_supported_total_tokens
        )
        if not info.manages_kv_cache:
            capacity = warm.num_blocks * warm.block_size
            if capacity < limits.max_total_tokens + warm.block_size:
                raise StartupError(
                    f"the KV cache holds {capacity} tokens, less than one request of --max-total-tokens "
                    f"{limits.max_total_tokens}: lower --max-total-tokens or give the KV cache more memory"
                )
            # Paged engines admit by free blocks; the flag can only lower the budget below capacity.
            limits = replace(limits, max_batch_total_tokens=min(cfg.max_batch_total_tokens or capacity, capacity))
            if limits.max_batch_total_tokens < limits.max_total_tokens + warm.block_size:
                raise StartupError(
                    f"--max-batch-total-tokens {limits.max_batch_total_tokens} cannot hold one request of "
                    f"--max-total-tokens {limits.max_total_tokens}: raise it or lower --max-total-tokens"
                )
        elif not cfg.max_batch_total_tokens and warm.max_supported_total_tokens:
            limits = replace(limits, max_batch_total_tokens=warm.max_supported_total_tokens)
        self.info, self.limits = info, limits
        self.scheduler = Scheduler(
            client=self.client,
            info=info,
            limits=limits,
            max_batch_size=max_batch_size or None,
            waiting_served_ratio=cfg.waiting_served_ratio,
            max_waiting_tokens=cfg.max_waiting_tokens,
            max_decode_steps=cfg.max_decode_steps,
            prefix_caching=cfg.prefix_caching,
            mixed_batches=cfg.mixed_batches,
            reserve_kv=cfg.scheduler_policy == "guaranteed_no_evict",
            arrivals=self.arrivals,
            burst_hold_s=cfg.burst_hold_ms / 1e3,
        )
        self.scheduler.start()
        self.ready = True
        log.info("router ready: %s", limits)

    @staticmethod
    async def _connect(url: str, timeout: float = 600.0) -> ShardedClient:
        """Shards may still be loading (docker-compose starts both at once): retry until timeout."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await ShardedClient.connect(url, timeout=10)
            except Exception as e:  # grpc raises AioRpcError while the socket is not there yet
                if time.monotonic() > deadline:
                    raise GenerationError(f"could not reach the shard at {url}: {e}") from e
                log.info("waiting for shard at %s ...", url)
                await asyncio.sleep(1.0)

    async def healthy(self) -> bool:
        """Readiness: warmed up and every rank answers Health (cached for a second)."""
        if not self.ready or self.client is None:
            return False
        now = time.monotonic()
        if now - self._health_checked > 1.0:
            self._health_ok = await self.client.health()
            self._health_checked = now
        return self._health_ok

    async def stop(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.client is not None:
            await self.client.close()
