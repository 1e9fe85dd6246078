"""inhouse: a company's own models behind one OpenAI-compatible API."""

__version__ = "0.1.0"
