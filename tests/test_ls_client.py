"""ls_client: which Label Studio and key a request uses, the SDK client per connection, and why the access-token
cache around the SDK's exchange is ours (the SDK's own cache, shown here against the same imitation of Label
Studio, can't do what tests/test_images.py asks of it)."""

from __future__ import annotations

import pytest
from label_studio_sdk import LabelStudio
from test_images import LEGACY, _serve, make_jwt

from config import Settings
from errors import LabelStudioError
from ls_client import Connection, LabelStudioClient, resolve_connection


@pytest.fixture
def ls():
    yield from _serve()


@pytest.mark.parametrize(
    "settings, hostname, token, expected",
    [
        ({}, "localhost:8080/", "setup-token", ("http://localhost:8080", "setup-token")),
        ({"label_studio_url": "https://ls.example/", "label_studio_api_key": "env-key"}, "http://other", "setup",
         ("https://ls.example", "env-key")),
        ({"label_studio_api_key": "env-key"}, "http://from-setup:8080", None, ("http://from-setup:8080", "env-key")),
        ({}, None, None, ("", "")),
    ],
)
def test_the_environment_wins_over_what_setup_sent(settings, hostname, token, expected):
    connection = resolve_connection(Settings(**settings), hostname, token)
    assert (connection.url, connection.key) == expected


@pytest.mark.parametrize("key, kind", [("", "none"), (LEGACY, "legacy"), ("a.b.c", "legacy"),
                                       (make_jwt("access"), "access"), (make_jwt("refresh"), "personal")])
def test_key_kinds(key, kind):
    assert Connection("http://ls", key).key_kind == kind


def test_the_key_is_not_in_the_repr():
    assert LEGACY not in repr(Connection("http://ls", LEGACY))


def test_one_sdk_client_per_connection(ls):
    client = LabelStudioClient(Settings())
    first = client.sdk(Connection(ls.url, LEGACY))
    assert isinstance(first, LabelStudio)
    assert client.sdk(Connection(ls.url, LEGACY)) is first
    assert client.sdk(Connection(ls.url, "other-key")) is not first
    with pytest.raises(LabelStudioError, match="Label Studio URL is unknown"):
        client.sdk(Connection("", LEGACY))


def test_an_expired_personal_access_token_is_refused_in_one_line(ls):
    client = LabelStudioClient(Settings())
    with pytest.raises(LabelStudioError, match="API key has expired") as info:
        client.authorization(Connection(ls.url, make_jwt("refresh", exp_in=-60)))
    assert "\n" not in str(info.value) and ls.refresh_calls == 0


def test_the_sdk_cache_reuses_an_access_token_about_to_expire_ours_does_not(ls):
    """Why the cache is ours: an access token 20 s from expiry. The SDK keeps sending it (it could expire in
    flight); LabelStudioClient exchanges again within ACCESS_TOKEN_MARGIN_S."""
    ls.access_ttl = 20.0
    pat = make_jwt("refresh")
    sdk = LabelStudio(base_url=ls.url, api_key=pat)
    headers = [sdk._client_wrapper.get_headers()["Authorization"] for _ in range(2)]
    assert headers[0] == headers[1] and ls.refresh_calls == 1
    ours = LabelStudioClient(Settings())
    mine = [ours.authorization(Connection(ls.url, pat))[0]["Authorization"] for _ in range(2)]
    assert mine[0] != mine[1] and ls.refresh_calls == 3


def test_the_sdk_cache_cannot_drop_a_refused_token_ours_can(ls):
    """After Label Studio refuses an access token (a restart with a new secret), the SDK still sends it until it
    expires; `authorization(stale=...)` replaces it."""
    pat = make_jwt("refresh")
    sdk = LabelStudio(base_url=ls.url, api_key=pat)
    before = sdk._client_wrapper.get_headers()["Authorization"]
    ls.valid_access.clear()
    assert sdk._client_wrapper.get_headers()["Authorization"] == before
    ours = LabelStudioClient(Settings())
    headers, cached = ours.authorization(Connection(ls.url, pat))
    again, cached_again = ours.authorization(Connection(ls.url, pat))
    assert again == headers and cached_again and not cached
    renewed, _ = ours.authorization(Connection(ls.url, pat), stale=headers["Authorization"].split()[1])
    assert renewed != headers and renewed["Authorization"].split()[1] in ls.valid_access
