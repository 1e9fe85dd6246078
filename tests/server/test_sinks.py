"""The metrics sink: route templates bound the route label, made-up model names are not labels."""

from __future__ import annotations

from prometheus_client.exposition import generate_latest

from inhouse.audit.record import AuditRecord
from inhouse.audit.writer import AuditUnavailableError
from inhouse.metrics import Metrics
from inhouse.server.sinks import AuditSink, MetricsSink, RouteTemplates

TEMPLATES = RouteTemplates(["/v1/chat/completions", "/v1/models", "/v1/models/{model_id:path}",
                            "/admin/keys/{key}", "/admin/keys/{key}/revoke"])


def test_paths_become_their_route_template() -> None:
    assert TEMPLATES("/v1/chat/completions") == "/v1/chat/completions"
    assert TEMPLATES("/v1/models/org/some-model") == "/v1/models/{model_id}"
    assert TEMPLATES("/admin/keys/key_123") == "/admin/keys/{key}"
    assert TEMPLATES("/admin/keys/key_123/revoke") == "/admin/keys/{key}/revoke"
    assert TEMPLATES("/wp-admin/setup.php") == "other"
    assert TEMPLATES("/v1/chat/completions/x") == "other"


async def test_a_model_name_the_client_made_up_is_not_a_label() -> None:
    metrics = Metrics(process=False)
    sink = MetricsSink(metrics, TEMPLATES, lambda name: name == "real")
    for asked in ("real", "made-up-1", "made-up-2"):
        assert await sink(AuditRecord(at=0, request_id="r", method="POST", path="/v1/chat/completions", status=404,
                                      model=asked, error_code="model_not_found"))
    text = generate_latest(metrics.registry).decode()
    assert "made-up" not in text
    assert 'model="real"' in text and 'model=""' in text


class _Writer:
    """An audit writer that commits, or cannot."""

    def __init__(self, fails: bool) -> None:
        self.fails = fails

    async def write(self, record: AuditRecord) -> None:
        if self.fails:
            raise AuditUnavailableError("down")


async def test_the_audit_sink_times_its_writes_and_counts_failures() -> None:
    metrics = Metrics(process=False)
    row = AuditRecord(at=0, request_id="r", method="POST", path="/v1/chat/completions", status=200)
    assert await AuditSink(_Writer(fails=False), metrics)(row)  # type: ignore[arg-type]
    assert not await AuditSink(_Writer(fails=True), metrics)(row)  # type: ignore[arg-type]
    text = generate_latest(metrics.registry).decode()
    assert "inhouse_audit_write_seconds_count 1.0" in text
    assert "inhouse_audit_write_failures_total 1.0" in text
