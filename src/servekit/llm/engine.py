"""LLMEngine: requests in, one continuous-batching step at a time, RequestOutputs out.

Not thread-safe: one thread drives it (``AsyncEngine`` runs it in its own thread).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from servekit.host_memory import keep_freed_memory
from servekit.llm.beam_search import BeamSearchRequests
from servekit.llm.block_manager import BlockManager
from servekit.llm.chat_template import resolve_chat_template
from servekit.llm.config import (
    EngineConfig,
    auto_num_kv_blocks,
    resolve_dtype,
    resolve_gguf_blocks,
    resolve_kv_cache_dtype,
    resolve_quantization,
)
from servekit.llm.detokenizer import IncrementalDetokenizer
from servekit.llm.device import (
    DeviceError,
    RunnerSettings,
    check_device_settings,
    gpu_memory_utilization,
    rank_threads,
    resolve_device,
)
from servekit.llm.distributed import check_tensor_parallel
from servekit.llm.errors import EngineInputError
from servekit.llm.inputs import EngineInput, InputProcessor
from servekit.llm.model_runner import ForwardBatch, ForwardOutput
from servekit.llm.outputs import Logprob, RequestOutput, logprob_entry
from servekit.llm.sampler import SampledToken, Sampler, make_generator
from servekit.llm.sampling_params import SamplingParams
from servekit.llm.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from servekit.llm.sequence import Sequence as Seq
from servekit.llm.sequence import SequenceGroup
from servekit.llm.stop import check_stop, effective_max_tokens
from servekit.prometheus import ITL_BOUNDS, Histogram
from servekit.threads import configure_threads

if TYPE_CHECKING:
    from servekit.llm.loaders import ModelSource
    from servekit.llm.model_config import ModelConfig
    from servekit.llm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class Runner(Protocol):
    """What the engine needs from a model runner (``ModelRunner`` implements it)."""

    block_size: int
    num_blocks: int

    def execute(self, batch: ForwardBatch) -> ForwardOutput: ...


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks held by live sequences
    num_kv_blocks: int
    num_free_kv_blocks: int
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # of which served from the cache
    prefix_cache_hit_rate: float
    num_preemptions: int
    num_steps: int
    num_prompt_tokens_computed: int  # prefill tokens the model actually ran (prefix hits excluded)
    num_generated_tokens: int
    forward_time_s: float  # time inside the model forward
    step_time_s: float  # whole step() time, forward included
    inter_token_latency: Histogram  # seconds between a request's consecutive tokens


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        source: ModelSource | None = None,
        runner: Runner | None = None,
    ) -> None:
        """Load the model named by ``config`` (or use ``source``) and build the runner and sampler.

        ``runner`` replaces the model runner (tests drive the engine with fakes through it).
        """
        self.config = config if config is not None else EngineConfig()
        cfg = self.config
        self.device = resolve_device(cfg.device)
        check_device_settings(cfg, self.device)
        configure_threads(rank_threads(cfg.num_threads, cfg.tp))
        if self.device.type == "cpu":
            keep_freed_memory()  # (activations on the CPU: reuse freed pages between steps)
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        if cfg.flush_denormal:
            torch.set_flush_denormal(True)
        if source is None:
            from servekit.llm.loaders import load_model_source

            source = load_model_source(cfg.model, tokenizer=cfg.tokenizer, revision=cfg.revision)
        self.source = source
        self.model_name = cfg.served_model_name or source.name
        self.model_config: ModelConfig = source.config
        self.tokenizer: Tokenizer = source.tokenizer
        self.max_model_len = cfg.max_model_len or source.config.max_position_embeddings
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.quantization = resolve_quantization(cfg.quantization, source.quantization, self.device)
        self.kv_cache_dtype = resolve_kv_cache_dtype(cfg.kv_cache_dtype, self.dtype, self.quantization)
        check_tensor_parallel(source.config, cfg.tp, quantization=self.quantization)
        if cfg.cuda_graphs and source.config.moe is not None:
            # The MoE layer reads its routing on the host (expert token counts): not capturable.
            raise DeviceError("cuda_graphs does not support mixture-of-experts models: leave it unset")
        # True: the checkpoint's quantised weights are computed on their GGUF blocks.
        self.gguf_blocks = resolve_gguf_blocks(
            cfg.gguf_weights,
            source.quantization is not None and source.blocks_factory is not None,
            self.dtype,
            self.quantization,
            self.device,
            cfg.tp,
        )
        logger.info(
            "compute: %s on %s%s, quantization %s%s, KV cache %s",
            str(self.dtype).removeprefix("torch."),
            self.device,
            f" x {cfg.tp} tensor-parallel ranks" if cfg.tp > 1 else "",
            self.quantization or "none",
            f" (checkpoint: {source.quantization}, {'on its blocks' if self.gguf_blocks else 'dequantised'})"
            if source.quantization
            else "",
            str(self.kv_cache_dtype).removeprefix("torch."),
        )
        if runner is None:
            runner = self._build_runner(source)
        self.runner = runner
        self.inputs = InputProcessor(
            self.tokenizer,
            source.config.vocab_size,
            self.max_model_len,
            resolve_chat_template(cfg.chat_template) if cfg.chat_template else source.chat_template,
        )
        self.eos_token_ids: list[int] = list(self.tokenizer.eos_token_ids)
        self.sampler = Sampler(self.eos_token_ids)
        self.block_manager = BlockManager(runner.num_blocks, runner.block_size, cfg.enable_prefix_caching)
        batched = self.scheduler_token_budget()
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=cfg.max_num_seqs,
                max_num_batched_tokens=batched,
                max_model_len=self.max_model_len,
                enable_chunked_prefill=cfg.enable_chunked_prefill,
                max_queued_requests=cfg.max_queued_requests,
                prefill_tokens_per_step=cfg.prefill_tokens_per_step,
            ),
            self.block_manager,
        )
        self.beam_search = BeamSearchRequests(
            self.block_manager, self._execute, self.tokenizer, self.eos_token_ids, self.max_model_len
        )
        self._groups: dict[str, SequenceGroup] = {}
        self._steps = 0
        self._forward_time = 0.0
        self._step_time = 0.0
        self._prompt_tokens_computed = 0
        self._generated_tokens = 0
        self._inter_token_latency = Histogram(ITL_BOUNDS)

    # -- requests ------------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int] | EngineInput | None = None,
        params: SamplingParams | None = None,
        *,
        prompt_token_ids: Sequence[int] | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request; ``prompt`` is text, token ids, or an ``EngineInput`` from ``self.inputs``
        (taken as it is, with its own params). Raises ValueError (PromptTooLongError,
        SamplingParamsError, ...) or QueueFullError at once, before anything is scheduled."""
        if request_id in self._groups:
            raise EngineInputError(f"request id {request_id!r} is already in use", "request_id")
        if isinstance(prompt, EngineInput):
            item = prompt
        elif isinstance(prompt, str) or prompt is None:
            item = self.inputs.prepare(prompt, params, prompt_token_ids)
        else:
            item = self.inputs.prepare(None, params, prompt)
        self.scheduler.check_capacity()
        text, token_ids, params = item.prompt, item.prompt_token_ids, item.params
        group = SequenceGroup(request_id, text, token_ids, params, arrival_time)
        max_tokens = effective_max_tokens(params, len(token_ids), self.max_model_len)
        if params.use_beam_search:
            self._groups[request_id] = group
            self.beam_search.add(group)
            return
        seq_params = params
        if params.best_of is not None and params.best_of > params.n and params.logprobs is None:
            # Ranking by cumulative logprob needs each token's logprob.
            seq_params = dataclasses.replace(params, logprobs=0)
        for index in range(params.num_candidates):
            seed = None if params.seed is None else params.seed + index
            seq = Seq(group, index, seq_params, make_generator(seed), max_tokens)
            seq.detokenizer = IncrementalDetokenizer(
                self.tokenizer,
                token_ids,
                skip_special_tokens=params.skip_special_tokens,
                spaces_between_special_tokens=params.spaces_between_special_tokens,
            )
            group.seqs.append(seq)
        self.scheduler.add(group)
        self._groups[request_id] = group

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Stop requests wherever they are (waiting, mid-prefill, decoding) and free their blocks."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            group = self._groups.pop(rid, None)
            if group is None:
                continue
            group.aborted = True
            self.beam_search.discard(group)
            self.scheduler.abort(group)

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    # -- stepping ------------------------------------------------------------------------------------

    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """Run one batch (prefill chunks and decodes together) and report every request it advanced.

        ``final_only``: report finished requests only (offline use; saves building partial outputs).
        """
        started = time.perf_counter()
        beam_group = self.beam_search.next_runnable(self.scheduler.has_unfinished())
        if beam_group is not None:
            return self._run_beam_search(beam_group, started)
        plan = self.scheduler.schedule()
        if plan.is_empty:
            self._step_time += time.perf_counter() - started
            return []
        batch = self._forward_batch(plan)
        result = self._execute(batch)
        touched = self._process(plan, batch, result)
        outputs = self._collect_outputs(touched, final_only)
        self._steps += 1
        self._step_time += time.perf_counter() - started
        return outputs

    def _execute(self, batch: ForwardBatch) -> ForwardOutput:
        started = time.perf_counter()
        result = self.runner.execute(batch)
        self._forward_time += time.perf_counter() - started
        return result

    def _run_beam_search(self, group: SequenceGroup, started: float) -> list[RequestOutput]:
        """One whole beam-search request as one step (``BeamSearchRequests`` runs the search)."""
        output = self.beam_search.run(group)
        self._groups.pop(group.request_id, None)
        self._generated_tokens += sum(len(seq.output_token_ids) for seq in group.seqs)
        self._steps += 1
        self._step_time += time.perf_counter() - started
        return [output] if output is not None else []

    def _forward_batch(self, plan: SchedulerOutput) -> ForwardBatch:
        token_ids: list[list[int]] = []
        starts: list[int] = []
        tables: list[list[int]] = []
        want_all: list[bool] = []
        sampled: list[bool] = []
        for item in plan.scheduled:
            seq = item.seq
            token_ids.append(seq.token_ids[item.start : item.start + item.num_tokens])
            starts.append(item.start)
            tables.append(seq.block_table)
            want_all.append(
                seq.index == 0 and seq.group.wants_prompt_logprobs and item.start < seq.prompt_len
            )
            sampled.append(item.completes)
        return ForwardBatch(
            token_ids, starts, tables, want_all if any(want_all) else None, None if all(sampled) else sampled
        )

    def _process(
        self, plan: SchedulerOutput, batch: ForwardBatch, result: ForwardOutput
    ) -> list[SequenceGroup]:
        bm = self.block_manager
        rows: list[int] = []
        sampling: list[Seq] = []
        touched: dict[str, SequenceGroup] = {}
        for row, item in enumerate(plan.scheduled):
            seq = item.seq
            group = seq.group
            if item.start < seq.prompt_len:
                self._prompt_tokens_computed += item.num_tokens
            seq.num_computed_tokens = item.start + item.num_tokens
            bm.cache_full_blocks(seq)
            if batch.all_logits is not None and batch.all_logits[row]:
                logits = result.all_logits[row]
                if logits is not None:
                    group.add_prompt_logits(logits)
            if seq.index == 0 and seq.num_computed_tokens >= seq.prompt_len and not group.prompt_computed:
                group.prompt_computed = True
                if group.wants_prompt_logprobs:
                    self._compute_prompt_logprobs(group)
            if item.completes:
                rows.append(row)
                sampling.append(seq)
        if not sampling:
            return []
        logits = result.last_logits
        if len(rows) != logits.shape[0]:  # a forward that returned every sequence's row (CUDA graphs)
            logits = logits[rows]
        sampled = self.sampler.sample(logits, sampling)
        now = time.time()
        for seq, token in zip(sampling, sampled, strict=True):
            self._append_token(seq, token)
            metrics = seq.group.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            elif seq.index == 0 and metrics.last_token_time is not None:
                self._inter_token_latency.observe(now - metrics.last_token_time)
            metrics.last_token_time = now
            touched[seq.group.request_id] = seq.group
        return list(touched.values())

    def _append_token(self, seq: Seq, token: SampledToken) -> None:
        entry = None
        if seq.logprobs is not None and token.logprob is not None:
            entry = logprob_entry(self.tokenizer, token.token_id, token.logprob, token.top_logprobs or [])
        seq.append_token(token.token_id, token.logprob, entry)
        self._generated_tokens += 1
        assert seq.detokenizer is not None
        new_text = seq.detokenizer.add_tokens([token.token_id])
        text = seq.detokenizer.text
        decision = check_stop(
            seq.sampling_params, seq.output_token_ids, text, len(new_text), self.eos_token_ids, seq.max_tokens
        )
        if decision.finished:
            if decision.text_end is None:
                # Nothing is cut, so the output ends here: release a held-back partial character too.
                seq.detokenizer.flush()
                seq.text = seq.detokenizer.text
            else:
                seq.text = text[: decision.text_end]
            seq.finish(decision.finish_reason or "stop", decision.stop_reason)
            self.scheduler.finish(seq)

    def _compute_prompt_logprobs(self, group: SequenceGroup) -> None:
        chunks = group.take_prompt_logits()
        num_top = group.params.prompt_logprobs or 0
        if not chunks:
            group.prompt_logprobs = [None]
            return
        logits = torch.cat(chunks, dim=0)[: group.leader.prompt_len]
        raw = self.sampler.prompt_logprobs(logits, group.prompt_token_ids, num_top)
        converted: list[dict[int, Logprob] | None] = []
        for _position, entry in enumerate(raw):
            if entry is None:
                converted.append(None)
                continue
            ranked = sorted(entry.items(), key=lambda kv: kv[1], reverse=True)
            ranks = {tid: rank for rank, (tid, _) in enumerate(ranked[:num_top], start=1)}
            converted.append(
                {
                    tid: Logprob(
                        value, ranks.get(tid), self.tokenizer.decode([tid], skip_special_tokens=False)
                    )
                    for tid, value in entry.items()
                }
            )
        group.prompt_logprobs = converted

    def _collect_outputs(self, touched: list[SequenceGroup], final_only: bool) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        now = time.time()
        for group in touched:
            finished = group.is_finished
            if finished:
                group.metrics.finished_time = now
                self._groups.pop(group.request_id, None)
            output = group.make_output(final_only=final_only)
            if output is not None:
                outputs.append(output)
        return outputs

    # -- introspection -------------------------------------------------------------------------------

    def get_stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting + len(self.beam_search.waiting),
            kv_cache_usage=bm.usage,
            num_kv_blocks=bm.num_blocks,
            num_free_kv_blocks=bm.num_free_blocks,
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
            prefix_cache_hit_rate=bm.prefix_hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self._steps,
            num_prompt_tokens_computed=self._prompt_tokens_computed,
            num_generated_tokens=self._generated_tokens,
            forward_time_s=self._forward_time,
            step_time_s=self._step_time,
            inter_token_latency=copy.deepcopy(self._inter_token_latency),
        )

    def reset_prefix_cache(self) -> None:
        self.block_manager.reset_prefix_cache()

    # -- construction helpers ------------------------------------------------------------------------

    def _build_runner(self, source: ModelSource) -> Runner:
        from servekit.llm.model_runner import ModelRunner

        cfg = self.config
        num_blocks = cfg.num_kv_blocks
        memory = cfg.kv_cache_memory_bytes()
        utilization = gpu_memory_utilization(cfg, self.device)
        if num_blocks is None and memory is None and utilization is None:
            num_blocks = auto_num_kv_blocks(
                source.config, self.kv_cache_dtype, cfg.block_size, self.max_model_len, cfg.max_num_seqs
            )
        settings = RunnerSettings(
            dtype=self.dtype,
            block_size=cfg.block_size,
            num_blocks=num_blocks,
            kv_cache_memory_bytes=None if num_blocks is not None else memory,
            max_model_len=self.max_model_len,
            quantization=self.quantization,
            kv_cache_dtype=self.kv_cache_dtype,
            gpu_memory_utilization=utilization if num_blocks is None and memory is None else None,
            profile_tokens=self.scheduler_token_budget(),
            cuda_graphs=cfg.cuda_graphs,
            max_num_seqs=cfg.max_num_seqs,
        )
        if cfg.tp > 1:
            from servekit.llm.tp_runner import TensorParallelRunner

            return TensorParallelRunner(cfg, source, settings, self.device)
        weights = source.iter_weight_blocks() if self.gguf_blocks else source.iter_weights()
        return ModelRunner(source.config, weights, device=self.device, **settings.runner_kwargs())

    def scheduler_token_budget(self) -> int:
        """The most tokens one step computes (what the activation profile runs)."""
        cfg = self.config
        if cfg.max_num_batched_tokens is not None:
            return cfg.max_num_batched_tokens
        return 2048 if cfg.enable_chunked_prefill else max(self.max_model_len, 2048)
