"""The kernel-cache policy (safefs/kernel_cache.py): every decision in one place, by role."""

from __future__ import annotations

import pytest

from safefs import kernel_cache
from safefs.kernel_cache import CachePolicy

pytestmark = pytest.mark.timeout(30)


def test_timeouts_follow_the_role_they_are_told_of() -> None:
    policy = CachePolicy(follower_poll=0.25)
    assert (policy.entry_timeout, policy.attr_timeout) == (60.0, 60.0)
    policy.on_role("follower")
    assert (policy.entry_timeout, policy.attr_timeout) == (0.25, 0.25)
    policy.follower_poll = 5.0
    policy.on_role("follower")
    assert policy.entry_timeout == kernel_cache.FOLLOWER_TIMEOUT_MAX  # bounded by a second
    policy.on_role("writer")
    assert (policy.entry_timeout, policy.attr_timeout) == (60.0, 60.0)


def test_the_writeback_cache_only_for_a_mount_that_starts_as_the_writer() -> None:
    assert kernel_cache.writeback_cache("writer") is kernel_cache.WRITEBACK_CACHE
    assert kernel_cache.writeback_cache("follower") is False


@pytest.mark.parametrize(
    ("follower", "unchanged", "keep"),
    [
        (False, None, True),  # the writer, nothing checked: only this host changes the file
        (True, None, False),  # a follower, nothing checked: the writer may have changed it
        (False, True, True),
        (True, True, True),  # checked and unchanged: the pages are right, on a follower too
        (False, False, False),
        (True, False, False),
    ],
)
def test_pages_are_kept_across_opens_only_when_they_cannot_be_stale(
    follower: bool, unchanged: bool | None, keep: bool
) -> None:
    assert kernel_cache.keep_pages(follower=follower, unchanged=unchanged) is keep
