"""Reading the JSON files a folder may hold (``config.json``, ``run.json``, probe metadata, shard
indexes): a JSON object or one ``ValueError`` line, whatever shape or encoding the file has."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_object(path: str | Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; ``what`` names it in the error (``"a model configuration"``).
    A missing file raises ``FileNotFoundError``; anything else that is not a JSON object, ``ValueError``."""
    p = Path(path)
    try:
        value = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not valid JSON ({str(e).splitlines()[0]})") from None
    except IsADirectoryError:
        raise ValueError(f"{p}: a folder, not {what}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{p}: not {what} (a JSON object expected, found {type(value).__name__})")
    return value
