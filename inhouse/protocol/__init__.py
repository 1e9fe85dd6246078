"""OpenAI wire formats: request models (pydantic, lenient about unknown fields) and response builders.

Nothing here knows about engines or HTTP; the server converts between these and the engine seam.
"""
