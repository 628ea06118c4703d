"""distckpt's benchmark against the alternatives and the disk's physical limit (issue 5).

Run ``python -m bench`` (see ``bench/README.md``).
"""
