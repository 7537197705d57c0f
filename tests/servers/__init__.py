"""Private servers and network partitions for the fault tests: faults that must never hit the
shared servers (restarting a store, moving its clock, cutting a worker off) are made on servers
and links of the test's own.

- ``PrivateMariaDB``: a ``mariadbd`` on its own port, datadir and socket, started by the test;
  stopped, SIGKILLed, frozen and restarted by pid.
- ``PrivateRedis``: a ``redis-server`` likewise.
- Either may serve TLS only (``TLSFiles``: the CA, certificate and key of the server): Redis on
  ``--tls-port`` with the plain port off, MariaDB with ``--ssl-*`` and, on request,
  ``require_secure_transport`` (a plain TCP connection is refused).
- ``PrivatePostgres``: ``initdb`` + ``postgres`` as the ``postgres`` OS user, in a folder of its
  own; with ``TLSFiles`` it takes TCP only over TLS (``hostssl``; ``hostnossl ... reject``).
- ``Namespace``: a network namespace joined to this host by a veth pair. Processes started in it
  reach the host's servers only through ``socat`` forwarders listening on the host side of the
  pair, so ``cut()`` (the host end of the pair set down) drops their packets silently, as a
  partition does; ``heal()`` brings it back. Needs root (CI runs as root).

Everything is cleaned up by pid or by the names this module made, never by a process name.
"""

from tests.servers._process import START_TIMEOUT, TLSFiles, _kill, _wait_port, free_port
from tests.servers.mariadb import PrivateMariaDB, private_mariadb
from tests.servers.netns import Namespace, namespace, namespaces_available
from tests.servers.postgres import PrivatePostgres, private_postgres
from tests.servers.redis_server import PrivateRedis, private_redis

__all__ = [
    "START_TIMEOUT",
    "Namespace",
    "PrivateMariaDB",
    "PrivatePostgres",
    "PrivateRedis",
    "TLSFiles",
    "_kill",
    "_wait_port",
    "free_port",
    "namespace",
    "namespaces_available",
    "private_mariadb",
    "private_postgres",
    "private_redis",
]
