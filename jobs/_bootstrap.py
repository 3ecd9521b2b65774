"""Make the jobs import *this checkout's* ``mtsam``.

Jobs do ``import _bootstrap`` before importing ``mtsam``. The checkout's ``platform/`` folder
goes to the front of ``sys.path``, so a job submitted with ``ray job submit --working-dir .``
runs the submitted code even on a node where another copy of the package is installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

PLATFORM_DIR = Path(__file__).resolve().parent.parent / "platform"


def ensure_mtsam_importable() -> None:
    path = str(PLATFORM_DIR)
    if path not in sys.path:
        sys.path.insert(0, path)


ensure_mtsam_importable()
