"""Is the Hugging Face Hub reachable? Asked once, quickly, before any Hub download, so an offline
machine gets one clear line at once instead of minutes of retries."""

from __future__ import annotations

import os
import socket
from functools import cache
from urllib.parse import urlparse


@cache
def reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
