"""The load generator: streaming OpenAI chat completions against the gateway, with asyncio + httpx.

Two arrival modes: ``closed`` (``concurrency`` clients, each sending its next request when the last one
ends) and ``open`` (Poisson arrivals at ``rate`` requests/s, whatever the server's state). A run stops
issuing at ``duration_s`` or ``max_requests``, whichever comes first, then drains what is in flight for at
most ``drain_timeout_s``; what is still running then is cancelled and recorded as failed.

Accounting: a :class:`RequestRecord` is created *before* its request is sent and is finished in a
``finally``, so every issued request ends as ``ok`` or with a recorded ``status``/``error``;
:func:`run_load` checks that no record is left open and that issued == ok + failed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import httpx
from tqdm import tqdm

from loadtests.workload import Lengths, Popularity, prompt

MODES = ("closed", "open")


class TargetNotLoopback(ValueError):
    """The target URL is not a loopback address: this tool only loads services on this machine."""


def check_loopback(url: str) -> None:
    """Raise :class:`TargetNotLoopback` unless ``url``'s host is ``localhost`` or a loopback IP literal.

    Host names other than ``localhost`` are refused without a DNS lookup (a name can resolve anywhere).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise TargetNotLoopback(f"target must be an http(s) URL, got {url!r}")
    host = parts.hostname or ""
    if host == "localhost":
        return
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise TargetNotLoopback(f"target host {host!r} is not a loopback address (use 127.0.0.1 or localhost)") \
            from None
    if not ip.is_loopback:
        raise TargetNotLoopback(f"target host {host} is not a loopback address; refusing to load it")


@dataclass
class LoadSpec:
    """One load run.

    Attributes:
        url: the gateway's base URL (loopback only). api_key: a tenant key.
        models: model names, in popularity rank order (index 0 is the most popular).
        popularity: ``single``, ``uniform`` or ``zipf``. zipf_alpha: Zipf's exponent.
        mode: ``closed`` (fixed concurrency) or ``open`` (Poisson arrivals at ``rate`` req/s).
        concurrency: closed loop: clients; open loop: unused (arrivals are not throttled).
        rate: open loop: mean arrivals per second.
        duration_s: stop issuing after this long. max_requests: stop issuing after this many.
        prompt_words: prompt length distribution, in words (about one token each, plus ~20 of template).
        output_tokens: ``max_tokens`` distribution; with ``ignore_eos`` every request produces exactly that.
        drain_timeout_s: how long in-flight requests may finish after issuing stops.
        request_timeout_s: longest wait between two bytes of one response.
        seed: seeds prompts, lengths, adapter picks and arrival times.
    """

    url: str
    api_key: str
    models: list[str]
    popularity: str = "zipf"
    zipf_alpha: float = 1.0
    mode: str = "closed"
    concurrency: int = 16
    rate: float = 1.0
    duration_s: float = 60.0
    max_requests: int = 10_000
    prompt_words: Lengths = field(default_factory=lambda: Lengths(32, 96))
    output_tokens: Lengths = field(default_factory=lambda: Lengths(32, 32))
    ignore_eos: bool = True
    drain_timeout_s: float = 120.0
    request_timeout_s: float = 300.0
    seed: int = 0
    progress: bool = True
    label: str = "load"

    def validate(self) -> None:
        check_loopback(self.url)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.models:
            raise ValueError("models must name at least one model, got none")
        for name in ("concurrency", "rate", "duration_s", "max_requests"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def describe(self) -> dict:
        d = asdict(self)
        d.pop("api_key")
        d["n_models"] = len(d.pop("models"))
        d["prompt_words"] = [self.prompt_words.low, self.prompt_words.high]
        d["output_tokens"] = [self.output_tokens.low, self.output_tokens.high]
        return d


@dataclass
class RequestRecord:
    """One request. Times are seconds since the run started; ``ttft`` and ``e2e`` are durations."""

    index: int
    model: str
    prompt_words: int
    max_tokens: int
    start: float
    end: float | None = None
    ttft: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    status: int | None = None
    ok: bool = False
    error: str | None = None
    # Inter-token latencies: the gaps between consecutive content chunks (one per decode step, as vLLM streams),
    # so a stall of the engine loop shows as one long gap that the mean ``tpot`` would average away.
    itl: list[float] = field(default_factory=list, repr=False)

    @property
    def finished(self) -> bool:
        return self.ok or self.error is not None

    @property
    def e2e(self) -> float | None:
        return None if self.end is None else self.end - self.start

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (decode pace)."""
        if self.end is None or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.end - self.start - self.ttft) / (self.output_tokens - 1)


@dataclass
class LoadResult:
    spec: dict
    records: list[RequestRecord]
    started_at: float  # wall clock (time.time()) when the run began
    duration_s: float  # first issue to last completion

    @property
    def ok(self) -> list[RequestRecord]:
        return [r for r in self.records if r.ok]

    @property
    def failed(self) -> list[RequestRecord]:
        return [r for r in self.records if not r.ok]


class _Run:
    def __init__(self, spec: LoadSpec, client: httpx.AsyncClient):
        self.spec, self.client = spec, client
        self.rng = random.Random(spec.seed)
        self.popularity = Popularity(spec.popularity, len(spec.models), spec.zipf_alpha)
        self.records: list[RequestRecord] = []
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + spec.duration_s
        self.bar = tqdm(total=spec.max_requests, desc=spec.label, unit="req", disable=not spec.progress,
                        mininterval=1.0, dynamic_ncols=True)
        self.n_failed = 0

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def may_issue(self) -> bool:
        return len(self.records) < self.spec.max_requests and time.perf_counter() < self.deadline

    def new_record(self) -> RequestRecord:
        rec = RequestRecord(index=len(self.records), model=self.spec.models[self.popularity.sample(self.rng)],
                            prompt_words=self.spec.prompt_words.sample(self.rng),
                            max_tokens=self.spec.output_tokens.sample(self.rng), start=self.now())
        self.records.append(rec)
        return rec

    async def send(self, rec: RequestRecord) -> None:
        body = {"model": rec.model, "stream": True, "max_tokens": rec.max_tokens, "temperature": 0.0,
                "messages": [{"role": "user", "content": prompt(random.Random(rec.index * 7919 + self.spec.seed),
                                                                 rec.prompt_words)}],
                "stream_options": {"include_usage": True}}
        if self.spec.ignore_eos:
            body["ignore_eos"] = True  # vLLM's sampling extension, passed through by the gateway
        try:
            async with self.client.stream("POST", "/v1/chat/completions", json=body) as resp:
                rec.status = resp.status_code
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    rec.error = f"HTTP {resp.status_code}: {text[:300]}"
                    return
                done = await self._consume(resp, rec)
                if rec.error is None and not done:
                    rec.error = "stream ended without [DONE]"
                elif rec.error is None:
                    rec.ok = True
        except asyncio.CancelledError:
            rec.error = "cancelled: still running at the drain timeout"
            raise
        except Exception as exc:  # noqa: BLE001 -- every failure is recorded, by type, never lost
            rec.error = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            rec.end = self.now()
            if rec.error is None and not rec.ok:
                rec.error = "unfinished"
            if not rec.ok:
                self.n_failed += 1
            self.bar.update(1)
            self.bar.set_postfix(failed=self.n_failed, refresh=False)

    async def _consume(self, resp: httpx.Response, rec: RequestRecord) -> bool:
        content_chunks = 0
        last = 0.0
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                if not rec.output_tokens:
                    rec.output_tokens = content_chunks
                return True
            event = json.loads(data)
            if "error" in event:
                rec.error = f"stream error: {json.dumps(event['error'])[:300]}"
                return False
            for choice in event.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    content_chunks += 1
                    now = self.now()
                    if rec.ttft is None:
                        rec.ttft = now - rec.start
                    else:
                        rec.itl.append(now - last)
                    last = now
            usage = event.get("usage")
            if usage:
                rec.output_tokens = int(usage.get("completion_tokens") or 0)
                rec.prompt_tokens = usage.get("prompt_tokens")
        return False

    async def closed_loop(self) -> None:
        async def client_loop() -> None:
            while self.may_issue():
                await self.send(self.new_record())

        await asyncio.gather(*(client_loop() for _ in range(self.spec.concurrency)))

    async def open_loop(self, tasks: set[asyncio.Task]) -> None:
        next_at = time.perf_counter()
        while True:
            next_at += self.rng.expovariate(self.spec.rate)
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if not self.may_issue():
                return
            task = asyncio.create_task(self.send(self.new_record()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)


async def run_load(spec: LoadSpec) -> LoadResult:
    """Run one load and return every request's record (checked: none lost, none left open)."""
    spec.validate()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    timeout = httpx.Timeout(connect=10.0, read=spec.request_timeout_s, write=30.0, pool=None)
    started_at = time.time()
    async with httpx.AsyncClient(base_url=spec.url, headers={"Authorization": f"Bearer {spec.api_key}"},
                                 limits=limits, timeout=timeout, trust_env=False) as client:
        run = _Run(spec, client)
        tasks: set[asyncio.Task] = set()
        if spec.mode == "closed":
            driver = asyncio.create_task(run.closed_loop())
        else:
            driver = asyncio.create_task(run.open_loop(tasks))
        # Closed loop: the driver ends when its clients do; open loop: when arrivals stop.
        remaining = spec.duration_s + spec.drain_timeout_s
        try:
            await asyncio.wait_for(asyncio.shield(driver), timeout=remaining)
        except TimeoutError:
            pass
        if tasks:
            left = max(0.0, run.t0 + remaining - time.perf_counter())
            await asyncio.wait(set(tasks), timeout=max(left, 0.001))
        for t in [driver, *tasks]:
            t.cancel()
        await asyncio.gather(driver, *tasks, return_exceptions=True)
        run.bar.close()
    records = run.records
    open_records = [r.index for r in records if not r.finished]
    if open_records:  # pragma: no cover -- the finally above makes this impossible; keep the check loud
        raise RuntimeError(f"requests left unaccounted for: {open_records[:10]}")
    ends = [r.end for r in records if r.end is not None]
    duration = (max(ends) - min(r.start for r in records)) if records else 0.0
    return LoadResult(spec=spec.describe(), records=records, started_at=started_at, duration_s=duration)
