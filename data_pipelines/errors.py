"""One exception type for bad input, shared by every package.

The CLI turns it into a single ``stimage: error: ...`` line and exit status 2, so a
message must be one line that names the offending file, gene, spot or value.
NumPy-only on purpose: the ONNX runtime (``export``) raises it without importing JAX.
"""

from __future__ import annotations

__all__ = ["StimageError"]


class StimageError(Exception):
    """Bad input a user can fix (missing file, unknown gene, wrong shape, ...)."""
