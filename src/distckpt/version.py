"""The library's version, recorded in every manifest (``library_version``) and printed by the CLI.

Its own module so that the layers below the package's ``__init__`` can read it
without importing the whole package. ``distckpt.__version__`` is the public name.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
