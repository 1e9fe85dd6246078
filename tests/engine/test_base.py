"""The seam's data: per-deployment sampling defaults are applied engine side, to what the client left out."""

from __future__ import annotations

from inhouse.config import SamplingDefaults, UpstreamSpec
from inhouse.engine.base import GenerateRequest, SamplingParams
from inhouse.engine.upstream import _body

DEFAULTS = SamplingDefaults(temperature=0.2, top_k=40, repetition_penalty=1.1)


def test_defaults_fill_only_what_the_client_left_out() -> None:
    asked = SamplingParams(temperature=0.9, unset=frozenset({"top_k", "top_p", "repetition_penalty"}))
    resolved = asked.with_defaults(DEFAULTS)
    assert (resolved.temperature, resolved.top_k, resolved.repetition_penalty, resolved.top_p) == (0.9, 40, 1.1, 1.0)
    assert resolved.unset == {"top_p"}  # no default for it: the neutral value stays, and it is still unset
    assert SamplingParams(temperature=0.9).with_defaults(DEFAULTS).temperature == 0.9  # nothing unset: untouched


def test_an_upstream_gets_its_deployment_defaults_and_its_own_for_the_rest() -> None:
    spec = UpstreamSpec(name="m", base_url="http://x/v1", defaults=SamplingDefaults(temperature=0.3))
    request = GenerateRequest("r", SamplingParams(unset=frozenset({"temperature", "top_p"})), prompt="hi")
    body = _body(request, spec)
    assert body["temperature"] == 0.3 and "top_p" not in body
