"""What the backend may fetch: the URL policy for every download a task names.

Task data is written by anyone who can import tasks, and the backend fetches what it names from inside the
operator's network. Two rules, applied at every hop of a download (redirects included):

  * Addresses: never connect to a link-local or cloud-metadata address (`REFUSED_NETWORKS`: 169.254.0.0/16,
    fe80::/10, the AWS IPv6 and Alibaba Cloud metadata addresses; IPv4-mapped IPv6 forms too). A host name is
    checked on the addresses it resolves to, at the moment of connecting (`GuardedAdapter`), and the connection
    goes to the address that was checked, so a name that resolves differently the second time (DNS rebinding)
    can't slip past.
  * Hosts (IMAGE_ALLOWED_HOSTS, optional): absolute image URLs, and every redirect they lead to, only to the
    named hosts. Label Studio's own host is always allowed, and the redirects Label Studio itself answers with
    (a presigned URL on the storage host) are followed: Label Studio chose them, not the task's author.

A refused URL raises `UrlRefused` naming the rule, before any connection is opened.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

# Link-local ranges (where every cloud's instance metadata service lives) and the metadata addresses outside them.
REFUSED_NETWORKS = {
    ipaddress.ip_network("169.254.0.0/16"): "link-local (cloud instance metadata: 169.254.169.254)",
    ipaddress.ip_network("fe80::/10"): "IPv6 link-local",
    ipaddress.ip_network("fd00:ec2::254/128"): "the AWS IPv6 instance metadata address",
    ipaddress.ip_network("100.100.100.200/32"): "the Alibaba Cloud instance metadata address",
}

Resolver = Callable[..., list]  # socket.getaddrinfo's signature


class UrlRefused(Exception):
    """A URL or address the policy refuses; the message names the rule."""


def refused_reason(address: str) -> str | None:
    """Why the policy refuses an IP address (a literal), or None when it may be connected to."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return next((why for network, why in REFUSED_NETWORKS.items() if ip in network), None)


def _ip_literal(host: str) -> str | None:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    return host


class UrlPolicy:
    """The rules above for one process. `allowed_hosts`: IMAGE_ALLOWED_HOSTS, lower-case host names ('*.example.com'
    also matches its subdomains); empty: any host. `resolve`: name resolution (socket.getaddrinfo; tests pass a
    stub)."""

    def __init__(self, allowed_hosts: Iterable[str] = (), resolve: Resolver = socket.getaddrinfo):
        self.allowed_hosts = tuple(h.strip().lower().rstrip(".") for h in allowed_hosts if h.strip())
        self.resolve = resolve

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return not self.allowed_hosts or any(
            host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:]))
            for pattern in self.allowed_hosts)

    def check_url(self, url: str, restricted: bool) -> None:
        """Refuse `url` before fetching it: an IP literal in a refused range, or (when `restricted`: a URL the task
        named, or a redirect it led to) a host outside IMAGE_ALLOWED_HOSTS. Names are checked when connecting."""
        host = urlsplit(url).hostname or ""
        literal = _ip_literal(host)
        if literal is not None and (why := refused_reason(literal)):
            raise UrlRefused(f"refused by the URL policy: {host} is {why}")
        if restricted and not self.host_allowed(host):
            raise UrlRefused(f"refused by the URL policy: host {host!r} is not in IMAGE_ALLOWED_HOSTS")

    def addresses(self, host: str, port: int) -> list[tuple]:
        """The socket addresses `host` resolves to, each checked; UrlRefused when any is refused (a name that also
        resolves to a metadata address is not trusted with the others)."""
        infos = self.resolve(host, port, 0, socket.SOCK_STREAM)
        for *_, sockaddr in infos:
            if why := refused_reason(sockaddr[0]):
                raise UrlRefused(f"refused by the URL policy: {host} resolves to {sockaddr[0]}, {why}")
        return [sockaddr for *_, sockaddr in infos]


class _GuardedConnection:
    """Mixed into urllib3's connections: resolve through the policy, check, and connect to a checked address."""

    policy: UrlPolicy

    def _new_conn(self):
        host = self._dns_host
        addresses = self.policy.addresses(host, self.port)
        error: Exception | None = None
        for sockaddr in addresses:
            # urllib3 connects to _dns_host; point it at the checked address for this one call (host, the TLS
            # server name and the Host header read it too, so it is put back at once).
            self._dns_host = sockaddr[0]
            try:
                return super()._new_conn()
            except OSError as e:  # urllib3's NewConnectionError, ConnectTimeoutError: try the next address
                error = e
            finally:
                self._dns_host = host
        raise error or OSError(f"{host} resolves to no address")


class GuardedAdapter(HTTPAdapter):
    """requests' adapter whose connections (plain and TLS) obey `policy`'s address rule. Proxies are left as they
    are: through a proxy (HTTP(S)_PROXY), the proxy resolves and connects, and only IP literals are checked here."""

    def __init__(self, policy: UrlPolicy, **kwargs):
        self.policy = policy
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        attrs = {"policy": self.policy}
        http = type("GuardedHTTPConnection", (_GuardedConnection, HTTPConnection), attrs)
        https = type("GuardedHTTPSConnection", (_GuardedConnection, HTTPSConnection), attrs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": type("GuardedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": http}),
            "https": type("GuardedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": https}),
        }


def guard(session: requests.Session, policy: UrlPolicy) -> requests.Session:
    """`session`, its http:// and https:// connections made to obey `policy`."""
    adapter = GuardedAdapter(policy)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
