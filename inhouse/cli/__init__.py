"""Command line: builds Settings from flags and files, then calls the app factory."""
