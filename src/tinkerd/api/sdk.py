"""The tinker SDK's own wire types: pydantic request models and protobuf messages.

The SDK's tensor helpers import torch when it is installed; the server never converts
tensors with them (bodies arrive as JSON and protobuf), and the API process must not load
torch just to parse requests. So the SDK is imported here with torch hidden from it, once
(when torch is already loaded, nothing is hidden: the SDK then sees it as usual).
"""

from __future__ import annotations

import sys

_hide_torch = "torch" not in sys.modules
if _hide_torch:
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
try:
    from tinker import types
    from tinker.proto import tinker_public_pb2 as pb
finally:
    if _hide_torch:
        del sys.modules["torch"]

__all__ = ["pb", "types"]
