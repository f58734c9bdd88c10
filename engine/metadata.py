"""Metadata as string-only tables (ONNX ``metadata_props``, safetensors headers) hold it."""

from __future__ import annotations

import json
from collections.abc import Mapping


def string_metadata(metadata: Mapping[str, object]) -> dict[str, str]:
    """Strings as they are, anything else as JSON: what a string-only metadata table holds."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
