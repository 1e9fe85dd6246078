"""The only package that knows HTTP: app factory, routes, SSE, error rendering."""

from inhouse.server.app import create_app

__all__ = ["create_app"]
