"""Worker hosts on other machines: a pool's tcp endpoint, CURVE keys, and ``minions worker-host``.

A worker host is a supervisor of local worker processes that serves one or more remote pools.
Its workers are ordinary workers on a private ipc socket of the host; the host relays their
frames over one CURVE-encrypted ZeroMQ connection per pool and reports what its own Supervisor
decides (a worker is ready, is leaving, died and why). Nothing here is a cluster: there is no
membership, leader or consensus. A host connects and serves; when it goes silent for
``host_timeout_s`` the pool ends or retries its calls and carries on. See
``docs/deployment/scale-out.md``.
"""
