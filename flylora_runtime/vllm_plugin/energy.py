"""Free energy of every generated token, per request, inside the engine (unlabelled quality monitoring).

For each token a request generates, the worker takes the raw logits of that sampling position (what the
model produced: before the grammar mask, penalties, temperature, top-k/p, any logits processor) and computes,
in fp32, vectorized over the batch:

- the free energy ``E = -T * logsumexp(logits / T)`` with ``T = 1``;
- the maximum softmax probability (a baseline, from the same pass) and, with ``FLYLORA_ENERGY=full``, the
  softmax entropy (another baseline; three more passes).

They are kept per request in the worker (:class:`EnergyLedger`, 12 bytes per token) and handed out by request
id on ``POST /flylora/energy`` of the engine's API server, which reaches the worker through vLLM's
``collective_rpc`` (the path vLLM itself documents for engine-side plugin state). The gateway asks for the
requests it has finished, in batches, after their answers went out: nothing is added to the OpenAI
responses, streamed and non-streamed requests are treated alike, and the hot path does not wait for it.

    POST /flylora/energy {"requests": [{"id": "chatcmpl-...", "tokens": 17}], "detail": false}
    -> {"results": {"chatcmpl-...": {"tokens": 17, "sequences": 1, "energy": -21.3, "max_prob": 0.81,
                                     "entropy": 0.74}}, "missing": []}

``id`` is the ``id`` of the engine's answer (vLLM's internal ids add an 8-character suffix, and ``<i>_`` per
choice when ``n > 1``; a list of prompts to ``/v1/completions`` adds ``-<k>`` per prompt: all of these are
found by the answer's id). ``tokens`` (optional) is the number of completion tokens the client received: with
one sequence, only the first ``tokens`` count (the worker may have run a step or two past a stop string
before the abort reached it). An entry is handed out once, then forgotten; unclaimed finished requests are
kept up to :data:`MAX_FINISHED` requests / :data:`MAX_FINISHED_TOKENS` tokens, oldest dropped first.

Cost: a fused log-softmax and a row maximum over the ``[requests, vocabulary]`` logits per step, and one
short Python loop over the batch's requests. Speculative decoding steps are skipped (their logits rows are
per draft position). ``FLYLORA_ENERGY`` (``flylora-engine --energy on|full|off``) picks what is measured;
``POST /flylora/energy/control {"enabled": false, "entropy": true}`` changes it at run time, and answers
(with or without a body) the steps measured and the worker seconds spent on them.
"""

from __future__ import annotations

import logging
import os
import re
import time
from array import array
from collections import OrderedDict
from typing import Any, Iterable, Sequence

import torch

logger = logging.getLogger("flylora.energy")

ENERGY_ENV = "FLYLORA_ENERGY"
RPC_METHOD = "flylora_energy_take"
CONTROL_METHOD = "flylora_energy_control"
ROUTE = "/flylora/energy"
CONTROL_ROUTE = "/flylora/energy/control"
#: Unclaimed finished requests kept in the worker (the oldest are dropped beyond either bound).
MAX_FINISHED = 16384
MAX_FINISHED_TOKENS = 2_000_000
#: Largest number of ids one ``POST /flylora/energy`` may ask for.
MAX_QUERY = 4096
STATS = ("energy", "max_prob", "entropy")

_SUFFIX_RE = re.compile(r"-[0-9a-zA-Z]{8}$")  # vLLM's random suffix of internal request ids
_CHILD_RE = re.compile(r"^(\d+)_")  # n > 1: "<i>_" per choice
_PROMPT_RE = re.compile(r"-(\d{1,4})$")  # /v1/completions with a list of prompts: "-<k>" per prompt


MODES = ("on", "full", "off")


def mode() -> str:
    """``FLYLORA_ENERGY``: ``on`` (energy and max probability; the default), ``full`` (also the entropy: three
    more passes over the logits, for evaluations), ``off`` (not installed)."""
    value = os.environ.get(ENERGY_ENV, "on").strip().lower()
    value = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}.get(value, value)
    if value not in MODES:
        raise ValueError(f"{ENERGY_ENV} must be one of {MODES}, got {value!r}")
    return value


def token_stats(logits: torch.Tensor, entropy: bool = True) -> torch.Tensor:
    """``[rows, 3]`` fp32: free energy (T = 1), max softmax probability and entropy (NaN unless ``entropy``).

    Few, fused passes: the cost on a busy CPU is mostly per parallel operation, not per element. With
    ``ls = log_softmax(x)`` (one fused pass) and its row maximum ``top`` at ``j``: ``ls_j = -log sum(exp(x -
    x_j))`` exactly, so ``E = -logsumexp(x) = top - x_j`` and ``max prob = exp(top)``. The entropy takes three
    more passes (``-sum(exp(ls) * ls)``). ``-inf`` logits contribute nothing.
    """
    ls = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # bf16/fp16 logits: upcast (fused on GPUs)
    top, where = ls.max(dim=-1)
    out = torch.empty((logits.shape[0], 3), dtype=torch.float32, device=logits.device)
    out[:, 0] = top - logits.gather(1, where.unsqueeze(1)).squeeze(1).float()
    out[:, 1] = top.exp()
    if entropy:
        ls.clamp_(min=-1e30)  # -inf -> a finite value whose exp is 0, so 0 * ls stays 0 (not nan)
        out[:, 2] = -torch.exp(ls).mul_(ls).sum(dim=-1)
    else:
        out[:, 2] = float("nan")
    return out


def split_id(internal_id: str) -> tuple[str, str]:
    """vLLM's internal request id -> (the answer's id, which sequence of that answer)."""
    ext = _SUFFIX_RE.sub("", internal_id, count=1)
    child = _CHILD_RE.match(ext)
    choice = ""
    if child:
        choice, ext = child.group(1), ext[child.end():]
    prompt = _PROMPT_RE.search(ext)
    if prompt:
        ext = ext[:prompt.start()]
        return ext, f"{prompt.group(1)}/{choice}"
    return ext, f"/{choice}"


class EnergyLedger:
    """Per-request token statistics in the worker: running requests, then finished ones until claimed."""

    def __init__(self, max_finished: int = MAX_FINISHED, max_finished_tokens: int = MAX_FINISHED_TOKENS):
        self.max_finished = max_finished
        self.max_finished_tokens = max_finished_tokens
        self.running: dict[str, array] = {}
        self.running_by_answer: dict[str, set[str]] = {}
        self.finished: OrderedDict[str, list[tuple[str, array]]] = OrderedDict()
        self.finished_tokens = 0
        self.claimed: set[str] = set()  # handed out while still running: later rows are dropped
        self._pending: tuple[list[str], torch.Tensor] | None = None
        self.measuring = True  # POST /flylora/energy/control can pause the per-step work
        self.entropy = False  # also the entropy (FLYLORA_ENERGY=full, or the control route)
        self.steps = 0  # steps measured
        self.busy_s = 0.0  # worker time spent here (per-step work, finishes, claims): the throughput cost

    def control(self, enabled: bool | None = None, entropy: bool | None = None) -> dict[str, Any]:
        """Pause or resume measuring, the entropy on or off; the counters of what it has cost so far."""
        if enabled is not None:
            self.measuring = bool(enabled)
        if entropy is not None:
            self.entropy = bool(entropy)
        return {"enabled": self.measuring, "entropy": self.entropy, "steps": self.steps,
                "busy_seconds": self.busy_s, "running": len(self.running), "unclaimed": len(self.finished)}

    # --- the worker's step ------------------------------------------------------------------------------
    def defer(self, req_ids: list[str], stats: torch.Tensor) -> None:
        """Keep a step's ``[rows, 3]`` stats (maybe still being computed on a device) until :meth:`fold`."""
        self.fold()
        self._pending = (req_ids, stats)

    def fold(self) -> None:
        """Add the deferred step to its requests (one device->host copy, one loop over the batch)."""
        if self._pending is None:
            return
        req_ids, stats = self._pending
        self._pending = None
        self.record(req_ids, stats.tolist())

    def record(self, req_ids: Sequence[str], rows: Sequence[Sequence[float]]) -> None:
        running = self.running
        for rid, row in zip(req_ids, rows):
            buf = running.get(rid)
            if buf is None:
                if rid in self.claimed:
                    continue
                buf = running[rid] = array("f")
                self.running_by_answer.setdefault(split_id(rid)[0], set()).add(rid)
            buf.extend(row)

    def finish(self, req_ids: Iterable[str]) -> None:
        """Requests vLLM finished or aborted: their statistics wait to be claimed."""
        self.fold()
        for rid in req_ids:
            self.claimed.discard(rid)
            buf = self.running.pop(rid, None)
            if buf is None:
                continue
            answer, seq = split_id(rid)
            self._unindex(answer, rid)
            self.finished.setdefault(answer, []).append((seq, buf))
            self.finished.move_to_end(answer)
            self.finished_tokens += len(buf) // 3
        while self.finished and (len(self.finished) > self.max_finished
                                 or self.finished_tokens > self.max_finished_tokens):
            _, seqs = self.finished.popitem(last=False)
            self.finished_tokens -= sum(len(b) for _, b in seqs) // 3

    def _unindex(self, answer: str, rid: str) -> None:
        ids = self.running_by_answer.get(answer)
        if ids is not None:
            ids.discard(rid)
            if not ids:
                del self.running_by_answer[answer]

    # --- claims -------------------------------------------------------------------------------------------
    def take(self, queries: Sequence[tuple[str, int | None]], detail: bool = False) -> dict[str, Any]:
        """Hand out (and forget) the statistics of the answers ``queries`` name: ``[(answer id, tokens)]``."""
        self.fold()
        results: dict[str, Any] = {}
        missing: list[str] = []
        for answer, tokens in queries:
            seqs = self.finished.pop(answer, [])
            if seqs:
                self.finished_tokens -= sum(len(b) for _, b in seqs) // 3
            for rid in self.running_by_answer.pop(answer, ()):
                buf = self.running.pop(rid, None)
                if buf is not None:
                    self.claimed.add(rid)
                    seqs.append((split_id(rid)[1], buf))
            summary = summarize(seqs, tokens, detail)
            if summary is None:
                missing.append(answer)
            else:
                results[answer] = summary
        return {"results": results, "missing": missing}


def summarize(seqs: list[tuple[str, array]], tokens: int | None, detail: bool) -> dict[str, Any] | None:
    """Means over the tokens of every sequence (one sequence: its first ``tokens`` if given)."""
    import numpy as np

    arrays = [np.frombuffer(buf, dtype=np.float32).reshape(-1, 3) for _, buf in sorted(seqs)]
    if len(arrays) == 1 and tokens is not None and 0 < tokens < arrays[0].shape[0]:
        arrays[0] = arrays[0][:tokens]
    arrays = [a for a in arrays if a.shape[0]]
    if not arrays:
        return None
    values = np.concatenate(arrays).astype(np.float64)
    means = values.mean(axis=0)
    out: dict[str, Any] = {"tokens": int(values.shape[0]), "sequences": len(arrays)}
    for name, value in zip(STATS, means.tolist()):
        out[name] = value if np.isfinite(value) else None
    if detail:
        out["per_token"] = [[[float(v) for v in row] for row in a.tolist()] for a in arrays]
    return out


LEDGER = EnergyLedger()
_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg, *args)


def observe_step(runner, logits: torch.Tensor | None, spec_decode_metadata) -> None:
    """Compute this step's token statistics from the raw logits (called before vLLM samples)."""
    if logits is None or not LEDGER.measuring:
        return
    if spec_decode_metadata is not None:
        _warn_once("spec", "FlyLoRA energy: speculative decoding steps are not measured")
        return
    num_reqs = runner.input_batch.num_reqs
    if logits.shape[0] != num_reqs:
        _warn_once("rows", "FlyLoRA energy: %d logits rows for %d requests; step not measured",
                   logits.shape[0], num_reqs)
        return
    req_ids = list(runner.input_batch.req_ids[:num_reqs])
    stats = token_stats(logits, entropy=LEDGER.entropy)
    discard = runner.discard_request_mask.np[:num_reqs]
    if discard.any():  # partial prefill chunks: their sampled token is thrown away
        keep = (~discard).nonzero()[0]
        req_ids = [req_ids[i] for i in keep.tolist()]
        stats = stats[torch.from_numpy(keep).to(stats.device)]
    LEDGER.defer(req_ids, stats)


def measuring_sample_tokens(original):
    """Replacement of ``GPUModelRunner.sample_tokens``: measure the step's raw logits before sampling
    (the original when ``FLYLORA_ENERGY=off``)."""
    if mode() == "off":
        return original
    LEDGER.entropy = mode() == "full"

    def sample_tokens(self, grammar_output):
        state = self.execute_model_state
        if state is not None and LEDGER.measuring:
            t0 = time.perf_counter()
            try:
                with torch.inference_mode():
                    observe_step(self, state.logits, state.spec_decode_metadata)
                LEDGER.steps += 1
            except Exception:  # never fail a step for a statistic
                logger.exception("FlyLoRA energy: step not measured")
            LEDGER.busy_s += time.perf_counter() - t0
        return original(self, grammar_output)

    return sample_tokens


def finishing_update_states(original):
    """Wraps ``GPUModelRunner._update_states``: finished requests' energies are closed before the step."""
    if mode() == "off":
        return original

    def _update_states(self, scheduler_output):
        if scheduler_output.finished_req_ids:
            t0 = time.perf_counter()
            LEDGER.finish(scheduler_output.finished_req_ids)
            LEDGER.busy_s += time.perf_counter() - t0
        return original(self, scheduler_output)

    return _update_states


def energy_take_method(_absent):
    """``WorkerBase.flylora_energy_take`` (added): the API server's route reads finished requests by RPC."""

    def flylora_energy_take(self, queries, detail=False):
        t0 = time.perf_counter()
        try:
            return LEDGER.take([(str(q[0]), q[1]) for q in queries], bool(detail))
        finally:
            LEDGER.busy_s += time.perf_counter() - t0

    return flylora_energy_take


def energy_control_method(_absent):
    """``WorkerBase.flylora_energy_control`` (added): pause/resume measuring, read the cost counters."""

    def flylora_energy_control(self, enabled=None, entropy=None):
        return LEDGER.control(enabled, entropy)

    return flylora_energy_control


def with_energy_route(original_attach):
    """Wraps ``attach_endpoint_plugins``: adds ``POST /flylora/energy`` after vLLM's routers."""
    if mode() == "off":
        return original_attach

    def attach_endpoint_plugins(app, supported_tasks):
        original_attach(app, supported_tasks)
        from flylora_runtime.vllm_plugin.energy_route import router

        app.include_router(router)

    return attach_endpoint_plugins
