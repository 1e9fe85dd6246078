"""The image's HEALTHCHECK: exit 0 when ``GET /ready`` answers 200, else 1 (the image has no curl).

``INHOUSE_HEALTHCHECK_URL`` overrides the URL (another port, or ``/health`` for liveness only).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

URL = os.environ.get("INHOUSE_HEALTHCHECK_URL", "http://127.0.0.1:8000/ready")

if __name__ == "__main__":
    try:
        with urllib.request.urlopen(URL, timeout=4) as answer:
            sys.exit(0 if answer.status == 200 else 1)
    except (urllib.error.URLError, OSError) as exc:
        print(f"{URL}: {exc}", file=sys.stderr)
        sys.exit(1)
