"""``python -m modelsmith.daemon``: run the daemon in the foreground (what ``modelsmith daemon`` runs)."""

from __future__ import annotations

import sys

from modelsmith.daemon.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

