"""Padded lengths: a batch is padded to a bucket, so a jitted step compiles once per
bucket (log many) instead of once per length, at most doubling the padded work.

The buckets are powers of two from a smallest length, capped by the longest allowed;
each user names its smallest (`data.batches.SMALLEST_BUCKET` for the train and eval
batches, `capability.SMALLEST_BUCKET` for the probe's rows, `generate.SMALLEST_BUCKET`
for prompts).
"""

from __future__ import annotations

from collections.abc import Sequence


def power_of_two_bucket(length: int, smallest: int) -> int:
    """The smallest power of two >= `length`, at least `smallest` (no upper bound)."""
    return max(smallest, 1 << max(0, int(length) - 1).bit_length())


def bucket_lengths(max_length: int, smallest: int) -> tuple[int, ...]:
    """The bucket lengths up to `max_length`: the powers of two from `smallest` below it,
    then `max_length` itself (just `(max_length,)` when it is <= `smallest`)."""
    out, length = [], smallest
    while length < max_length:
        out.append(length)
        length *= 2
    return (*out, max_length)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest of `buckets` that holds `length` tokens."""
    for b in sorted(buckets):
        if length <= b:
            return b
    raise ValueError(f"a row of {length} tokens is longer than the largest bucket {max(buckets)}")
