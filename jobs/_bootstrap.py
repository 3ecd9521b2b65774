"""Make ``mtsam`` importable when a job runs from a checkout without installing the package.

Jobs do ``import _bootstrap`` before importing ``mtsam``: when ``import mtsam`` fails, the
checkout's ``platform/`` folder is put at the front of ``sys.path``.
"""

from __future__ import annotations

import sys
from pathlib import Path

PLATFORM_DIR = Path(__file__).resolve().parent.parent / "platform"


def ensure_mtsam_importable() -> None:
    try:
        import mtsam  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(PLATFORM_DIR))


ensure_mtsam_importable()
