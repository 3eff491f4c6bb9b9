"""Prometheus metrics of the gateway, on a registry owned by the app (no process-global state).

Label policy: tenant names may be labels (admins choose them); adapter names are capped at
``max_adapter_labels`` distinct ``tenant/adapter`` values, the rest sharing ``other``, so thousands of
adapters cannot explode the series count. Keys, prompts and internal ids are never labels.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

OTHER = "other"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class AdapterLabels:
    """Caps distinct adapter label values.

    The first ``limit`` distinct ``(tenant, adapter)`` pairs seen keep the adapter's name as label; later
    ones get ``other``. Names in ``always`` (the base model) are never capped.
    """

    def __init__(self, limit: int, always: tuple[str, ...] = ()):
        self.limit = limit
        self.always = set(always)
        self.known: set[tuple[str, str]] = set()

    def __call__(self, tenant: str, adapter: str) -> str:
        if adapter in self.always or (tenant, adapter) in self.known:
            return adapter
        if len(self.known) < self.limit:
            self.known.add((tenant, adapter))
            return adapter
        return OTHER


class Children(dict):
    """``metric.labels(*key)`` per label tuple, looked up once: the hot path's per-request metrics.

    ``labels()`` checks and locks on every call; a child found here is the same object it returns, so
    the exported series are unchanged. Values in the key are passed through ``str``.
    """

    def __init__(self, metric: Any):
        super().__init__()
        self.metric = metric

    def __missing__(self, key: tuple) -> Any:
        child = self[key] = self.metric.labels(*(str(v) for v in key))
        return child


class GatewayMetrics:
    """Every metric the gateway exports."""

    def __init__(self, *, max_adapter_labels: int, base_model_id: str):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.adapter_label = AdapterLabels(max_adapter_labels, always=(base_model_id,))
        self.requests = Counter("flylora_gateway_requests", "Completion requests by tenant, endpoint and status.",
                                ["tenant", "endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("flylora_gateway_prompt_tokens", "Prompt tokens by tenant and adapter.",
                                     ["tenant", "adapter"], registry=r)
        self.completion_tokens = Counter("flylora_gateway_completion_tokens",
                                         "Completion tokens by tenant and adapter.", ["tenant", "adapter"], registry=r)
        self.latency = Histogram("flylora_gateway_request_duration_seconds",
                                 "End-to-end latency of completion requests.", ["endpoint", "stream"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("flylora_gateway_time_to_first_token_seconds",
                              "Time from request to the first streamed token.", ["endpoint"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.in_flight = Gauge("flylora_gateway_in_flight_requests", "Completion requests in flight by tenant.",
                               ["tenant"], registry=r)
        self.upstream_errors = Counter("flylora_gateway_upstream_errors",
                                       "Failed calls to engines by engine and kind.", ["engine", "kind"], registry=r)
        self.uploads = Counter("flylora_gateway_adapter_uploads", "Adapters uploaded and registered.",
                               ["tenant"], registry=r)
        self.deletes = Counter("flylora_gateway_adapter_deletes", "Adapters deleted.", ["tenant"], registry=r)
        self.validation_failures = Counter("flylora_gateway_adapter_validation_failures",
                                           "Rejected adapter uploads by reason.", ["tenant", "reason"], registry=r)
        self.routing = Counter("flylora_gateway_routing",
                               "Routing decisions: affinity_hit (to a replica that served the adapter before), "
                               "affinity_miss, base (base model), failover (a retry on another replica).",
                               ["result"], registry=r)
        for result in ("affinity_hit", "affinity_miss", "base", "failover"):
            self.routing.labels(result)
        self.engine_ready = Gauge("flylora_gateway_engine_ready", "1 when the engine's /health answered 200.",
                                  ["engine"], registry=r)
        # Children of the per-request metrics by label values (see Children).
        self.requests_by = Children(self.requests)
        self.in_flight_by = Children(self.in_flight)
        self.latency_by = Children(self.latency)
        self.ttft_by = Children(self.ttft)
        self.routing_by = Children(self.routing)
        self._prompt_tokens_by = Children(self.prompt_tokens)
        self._completion_tokens_by = Children(self.completion_tokens)

    def tokens(self, tenant: str, adapter: str, prompt: int, completion: int) -> None:
        if prompt or completion:
            key = (tenant, self.adapter_label(tenant, adapter))
            if prompt:
                self._prompt_tokens_by[key].inc(prompt)
            if completion:
                self._completion_tokens_by[key].inc(completion)
