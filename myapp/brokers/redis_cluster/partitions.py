"""Channels to partitions, and partitions to hash tags that spread evenly over a cluster's slots.

A channel's partition is ``zlib.crc32(channel.encode("utf-8")) % partitions``
(CRC-32 as in zlib, gzip and PNG): stable across processes, hosts and
Python versions, unlike ``hash()``.

Every key and shard channel of partition ``p`` carries the hash tag
``{<partitions>.<p>.<n>}``, so they share one hash slot (Redis Cluster
specification, "Hash tags"). ``n`` is the smallest number that puts the
slot in the ``p``-th of ``partitions`` equal ranges of the 16384 slots:
with nodes that own equal contiguous ranges (what ``valkey-cli --cluster
create`` and scripts/servers' ``ValkeyCluster`` assign), the partitions
spread evenly over the nodes, where plain tags ``{0}..{N}`` would cluster
on some. The partition count is part of the tag, so changing it never
mixes two mappings in one key.
"""

import zlib

from redis.crc import key_slot

__all__ = ["SLOTS", "partition_of", "tags"]

#: Hash slots of a Redis Cluster.
SLOTS = 16384


def partition_of(channel, partitions):
    """Return the partition (int in ``range(partitions)``) of ``channel`` (str)."""
    return zlib.crc32(channel.encode("utf-8")) % partitions


def tags(partitions):
    """Return the hash tag of each partition (list of str, without braces) and their slots (list of int)."""
    found, slots = [], []
    for part in range(partitions):
        low, high = part * SLOTS // partitions, (part + 1) * SLOTS // partitions
        n = 0
        while True:
            tag = f"{partitions}.{part}.{n}"
            slot = key_slot(tag.encode())
            if low <= slot < high:
                break
            n += 1
        found.append(tag)
        slots.append(slot)
    return found, slots
