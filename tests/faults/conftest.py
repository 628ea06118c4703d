"""The fault catalogue runs on the session's shared warm pool (``world_pool``, tests/conftest.py)."""
