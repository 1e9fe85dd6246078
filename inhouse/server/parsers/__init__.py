"""Reads thinking and tool calls out of a model's text, per choice, as it streams.

A generator's engine names its parsers (``EngineInfo.tool_parser``/``reasoning_parser``, picked from its chat
template or its config); an upstream engine names none and its deltas pass through as they came.  Each parser is a
small pure state machine over text pieces that holds back only what could still be the start of a tag; a
``ChoiceParser`` chains the reasoning parser into the tool parser and keeps every Delta's token count, logprobs,
usage and finish reason (a choice that called a tool finishes with ``"tool_calls"``).  Nothing here knows HTTP.
"""

from __future__ import annotations

from inhouse.server.parsers.choice import ChoiceParser, choice_parser
from inhouse.server.parsers.envelope import EnvelopeParser
from inhouse.server.parsers.hermes import HermesParser
from inhouse.server.parsers.json_calls import Llama3JsonParser, MistralParser
from inhouse.server.parsers.think import ThinkParser

__all__ = ["ChoiceParser", "EnvelopeParser", "HermesParser", "Llama3JsonParser", "MistralParser", "ThinkParser",
           "choice_parser"]
