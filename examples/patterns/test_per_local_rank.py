"""Property test of the example pattern: this is all a pattern author writes."""

import pytest
from per_local_rank import PerLocalRank

from distckpt.testing import check_pattern


def test_per_local_rank_keeps_every_promise_on_threaded_worlds() -> None:
    check_pattern(PerLocalRank(), max_examples=100)


@pytest.mark.timeout(600)
def test_per_local_rank_keeps_every_promise_on_real_gloo_worlds() -> None:
    check_pattern(PerLocalRank(), max_examples=4, processes=True, max_world=4)
