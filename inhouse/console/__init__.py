"""The web console: static files only (``static/``), served at ``/console`` by ``inhouse.server.routes.console``.

``static/vendor/`` holds the one frontend library (htm + Preact, ``htm/preact/standalone``), copied from npm by
``scripts/vendor_console.sh``; nothing is loaded from the internet at run time.
"""
