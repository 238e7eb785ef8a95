"""The URL policy (urlpolicy.py) on its own and through the image loader.

Nothing here connects anywhere but 127.0.0.1: host names resolve through a stub (`STUB`), the addresses the policy
refuses are only ever compared, never connected to, and `loopback_only` fails any test whose code would open a
connection elsewhere."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import replace

import pytest
import requests
from test_images import IMAGE_PATH, LEGACY, FakeServer, _serve, auth_headers, gets

from config import Settings
from images import ImageError, ImageLoader
from urlpolicy import UrlPolicy, UrlRefused, refused_reason

METADATA_V4 = "169.254.169.254"
STUB = {  # host name -> the addresses a stub DNS gives it
    "images.test": ["127.0.0.1"],
    "ls.test": ["127.0.0.1"],
    "storage.test": ["127.0.0.1"],
    "other.test": ["127.0.0.1"],
    "metadata.test": [METADATA_V4],
    "metadata6.test": ["fd00:ec2::254"],
    "rebind.test": ["127.0.0.1", METADATA_V4],  # also a metadata address: none of them is trusted
}


def stub_resolve(host, port, family=0, type=0, proto=0, flags=0):
    """socket.getaddrinfo over STUB (and IP literals); any other name fails to resolve."""
    try:
        addresses = STUB[host] if host in STUB else [str(ipaddress.ip_address(host))]
    except ValueError:
        raise socket.gaierror(socket.EAI_NONAME, f"stub resolver: unknown name {host}") from None
    return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
             (a, port, 0, 0) if ":" in a else (a, port)) for a in addresses]


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Fail the test, before any packet, if code under test connects to anything but the loopback address."""
    real_connect = socket.socket.connect

    def connect(sock, address):
        if address[0] not in ("127.0.0.1", "::1"):
            raise AssertionError(f"a connection to {address[0]} was attempted")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture
def server():
    yield from _serve()


@pytest.fixture
def storage():
    yield from _serve()


def loader(allowed: str = "", **fields) -> ImageLoader:
    settings = Settings.from_env({"IMAGE_ALLOWED_HOSTS": allowed}) if allowed else Settings()
    settings = replace(settings, **fields)
    session = requests.Session()
    session.trust_env = False
    return ImageLoader(settings, session, policy=UrlPolicy(settings.image_allowed_hosts, resolve=stub_resolve))


def at(server: FakeServer, host: str, path: str = "/plain.jpg") -> str:
    return f"http://{host}:{server.server_address[1]}{path}"


@pytest.mark.parametrize("address, refused", [
    (METADATA_V4, "link-local"), ("169.254.0.1", "link-local"), ("fe80::1", "IPv6 link-local"),
    ("fe80::1%eth0", "IPv6 link-local"), ("fd00:ec2::254", "AWS IPv6"), ("::ffff:169.254.169.254", "link-local"),
    ("100.100.100.200", "Alibaba"), ("127.0.0.1", None), ("::1", None), ("198.51.100.7", None),
    ("fd00:ec2::253", None), ("100.100.100.201", None),
])
def test_refused_reason(address, refused):
    reason = refused_reason(address)
    assert (reason is None) if refused is None else (refused in reason)


@pytest.mark.parametrize("allowed, host, ok", [
    ("", "anything.example", True), ("images.test", "images.test", True), ("images.test", "IMAGES.TEST.", True),
    ("images.test", "other.test", False), ("*.images.test", "a.b.images.test", True),
    ("*.images.test", "images.test", False), ("*.images.test", "evilimages.test", False),
    ("images.test, ls.test", "ls.test", True),
])
def test_allowed_hosts(allowed, host, ok):
    policy = UrlPolicy(Settings.from_env({"IMAGE_ALLOWED_HOSTS": allowed}).image_allowed_hosts)
    assert policy.host_allowed(host) is ok


def test_a_name_resolving_to_the_metadata_address_is_refused_before_connecting(server):
    for host, address in (("metadata.test", METADATA_V4), ("metadata6.test", "fd00:ec2::254"),
                          ("rebind.test", METADATA_V4)):
        with pytest.raises(ImageError) as info:
            loader().load(at(server, host))
        assert info.value.kind == "refused", info.value
        assert f"{host} resolves to {address}" in str(info.value) and "URL policy" in str(info.value)
    assert server.requests == []


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/x.png",
                                 "http://[fd00:ec2::254]/latest/meta-data/", "http://[::ffff:169.254.169.254]/",
                                 "https://100.100.100.200/latest/meta-data/"])
def test_an_address_literal_in_a_refused_range_is_refused(url):
    with pytest.raises(ImageError, match="refused by the URL policy") as info:
        loader().load(url)
    assert info.value.kind == "refused"


@pytest.mark.parametrize("target", ["http://169.254.169.254/latest/meta-data/", "http://metadata.test/latest/",
                                    "http://[fd00:ec2::254]/latest/"])
def test_a_redirect_into_a_refused_range_is_refused_at_that_hop(server, target):
    with pytest.raises(ImageError, match="refused by the URL policy") as info:
        loader().load(at(server, "images.test", f"/redirect?to={target}"))
    assert info.value.kind == "refused"
    assert len(gets(server)) == 1  # the first hop was fetched, the second never


def test_allowed_hosts_restrict_task_urls_and_their_redirects(server):
    images = loader("images.test")
    assert images.load(at(server, "images.test")).shape == (4, 6, 3)
    with pytest.raises(ImageError, match="host 'other.test' is not in IMAGE_ALLOWED_HOSTS") as info:
        images.load(at(server, "other.test"))
    assert info.value.kind == "refused"
    with pytest.raises(ImageError, match="'other.test' is not in IMAGE_ALLOWED_HOSTS"):
        images.load(at(server, "images.test", f"/redirect?to={at(server, 'other.test')}"))
    assert gets(server) == ["/plain.jpg", f"/redirect?to={at(server, 'other.test')}"]


def test_label_studio_and_the_storage_it_redirects_to_are_always_allowed(server, storage):
    """IMAGE_ALLOWED_HOSTS names only images.test: Label Studio's uploads and its presigned redirects still work."""
    server.storage_url = f"http://storage.test:{storage.server_address[1]}"
    images = loader("images.test", label_studio_url=at(server, "ls.test", ""), label_studio_api_key=LEGACY)
    assert images.load(IMAGE_PATH).shape == (4, 6, 3)
    assert images.load("s3://bucket/img.png", task_id=4).shape == (4, 6, 3)
    assert auth_headers(storage) == [None]
    # ... but the address rule holds there too.
    server.storage_url = "http://metadata.test"
    with pytest.raises(ImageError, match="metadata.test resolves to 169.254.169.254"):
        images.load("s3://bucket/img.png", task_id=4)


def test_a_refused_task_is_that_tasks_failure_and_the_others_complete(server):
    from cache import EmbeddingCache
    from labeling import parse_label_config
    from loader import Models
    from pipeline import Pipeline, TaskFailure

    images = loader()
    pipeline = Pipeline(Models(None, None, EmbeddingCache(8, 2**26)), images._settings, images)
    config = parse_label_config('<View><Image name="image" value="$image"/><RectangleLabels name="l" '
                                'toName="image"><Label value="cats"/></RectangleLabels></View>')
    loaded = [pipeline._load_task({"id": i, "data": {"image": url}}, config, None, None) for i, url in
              enumerate([at(server, "images.test"), at(server, "metadata.test"), at(server, "images.test")])]
    assert isinstance(loaded[1], TaskFailure) and loaded[1].kind == "refused"
    assert [type(item) for item in loaded[::2]] == [tuple, tuple]


def test_policy_check_url_names_the_rule():
    with pytest.raises(UrlRefused, match="169.254.169.254 is link-local"):
        UrlPolicy().check_url("http://169.254.169.254/", restricted=False)
    UrlPolicy(["images.test"]).check_url("http://other.test/", restricted=False)  # not a task URL: no allow-list


def test_https_through_the_policy_verifies_the_certificate_of_the_name_not_of_the_address(tmp_path):
    """The connection goes to the checked address, while TLS still checks the certificate against the host name
    (a presigned URL is https:// on the storage host)."""
    import shutil
    import ssl
    import subprocess
    import threading

    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=images.test", "-addext", "subjectAltName=DNS:images.test", "-keyout", str(key), "-out",
                    str(cert)], check=True, capture_output=True)
    server = FakeServer()
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        images = loader()
        images._session.verify = str(cert)
        url = f"https://images.test:{server.server_address[1]}/plain.jpg"
        assert images.load(url).shape == (4, 6, 3)
        STUB["wrong-name.test"] = ["127.0.0.1"]  # same address, a name the certificate does not hold
        with pytest.raises(ImageError, match=r"wrong-name\.test.*(?i:hostname mismatch|certificate)"):
            images.load(url.replace("images.test", "wrong-name.test"))
    finally:
        STUB.pop("wrong-name.test", None)
        server.shutdown()
        server.server_close()
