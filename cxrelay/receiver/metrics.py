"""Prometheus metrics of the receiver, in a registry of its own (one per app)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cxrelay.core.health import Health, state_value

MAX_TARGET_LABELS = 50


class ReceiverMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.accepted = Counter("cxrelay_webhooks_accepted_total", "Events acknowledged (new)",
                                ["source"], registry=self.registry)
        self.duplicates = Counter("cxrelay_webhooks_duplicate_total",
                                  "Events acknowledged as duplicates", ["source"],
                                  registry=self.registry)
        self.rejected = Counter("cxrelay_webhooks_rejected_total", "Requests rejected",
                                ["source", "reason"], registry=self.registry)
        self.ack_latency = Histogram(
            "cxrelay_webhook_ack_seconds", "Time from request to acknowledgement",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry)
        self.drift = Gauge("cxrelay_schema_drift_events", "Events that drifted from the contract, "
                           "by field", ["contract", "field", "kind"], registry=self.registry)
        self.inbox_depth = Gauge("cxrelay_inbox_depth", "Events waiting or in progress",
                                 registry=self.registry)
        self.artifacts_pending = Gauge(
            "cxrelay_artifacts_pending", "Finished events whose Prefect artifact is not written "
            "yet (written while the dispatcher has a free slot)", registry=self.registry)
        # The notification consumer runs in its own process: these are read from the status it
        # saves in the store every few seconds.
        self.notification = {
            name: Gauge(f"cxrelay_notification_{name}", help_text, ["consumer"],
                        registry=self.registry)
            for name, help_text in (
                ("channels", "Notification channels the consumer runs"),
                ("topics", "Topics subscribed over all channels"),
                ("open_sockets", "Channel sockets open"),
                ("reconnects", "Sockets lost and reopened since the consumer started"),
                ("last_message_age_seconds", "Seconds since the earliest of the channels' "
                 "last messages (heartbeats included)"),
            )}
        self.notification_gaps = Gauge("cxrelay_notification_gaps", "Intervals without a live "
                                       "socket, by status (open, closed, filled)", ["status"],
                                       registry=self.registry)
        self.target_state = Gauge("cxrelay_target_state", "0 healthy, 1 paused (probing)",
                                  ["target"], registry=self.registry)
        self.target_waiting = Gauge("cxrelay_target_waiting_events",
                                    "Conversations whose newest event waits for a paused target",
                                    ["target"], registry=self.registry)
        self.target_pending = Gauge("cxrelay_target_pending_deliveries",
                                    "Deliveries mapped for a target and not settled yet (its "
                                    "pace, a pause, its API allocation)", ["target"],
                                    registry=self.registry)
        self.api_used = Gauge("cxrelay_salesforce_api_requests_used", "The org's API requests "
                              "in the rolling 24 h, as Salesforce last said", ["target"],
                              registry=self.registry)
        self.api_allocation = Gauge("cxrelay_salesforce_api_allocation", "The org's daily API "
                                    "allocation", ["target"], registry=self.registry)
        self._children: dict[tuple[str, bool], Any] = {}

    def deliveries(self, pending: Mapping[str, int], usage: Sequence[Any]) -> None:
        self.target_pending.clear()
        for name in sorted(pending)[:MAX_TARGET_LABELS]:
            self.target_pending.labels(name).set(pending[name])
        for each in usage[:MAX_TARGET_LABELS]:
            self.api_used.labels(each.target).set(each.used)
            self.api_allocation.labels(each.target).set(each.allocation)

    def targets(self, health: Sequence[Health], waiting: Mapping[str, int]) -> None:
        """Set the target gauges from the store. Targets are the pipeline's (a handful), and
        at most `MAX_TARGET_LABELS` names are exported whatever the store holds; a target with
        several orgs shows paused when any of them is."""
        states: dict[str, int] = {}
        for each in health:
            states[each.target] = max(states.get(each.target, 0), state_value(each))
        names = sorted(set(states) | set(waiting))[:MAX_TARGET_LABELS]
        self.target_state.clear()
        self.target_waiting.clear()
        for name in names:
            self.target_state.labels(name).set(states.get(name, 0))
            self.target_waiting.labels(name).set(waiting.get(name, 0))

    def acknowledged(self, source: str, new: bool, seconds: float) -> None:
        """Count one 202 (children cached: a labelled lookup per request is measurable)."""
        child = self._children.get((source, new))
        if child is None:
            child = (self.accepted if new else self.duplicates).labels(source)
            self._children[(source, new)] = child
        child.inc()
        self.ack_latency.observe(seconds)
