"""Settings of the coordinator contract (``shared/specs/coordinator-http-api.md``).

The specification's variables keep their exact names (``KEY_VERIFICATION_URL``, ``EVENT_CALLBACK_AUTH``,
``COMMANDS_API_AUTH_TOKEN``, ...); our own additions follow the usual prefixes (``SM_``, ``AGENT_``).
Each process exposes only the groups it uses, each option also a command-line flag:

- node agent: :data:`KEY_VERIFICATION_OPTIONS` and :data:`MEDIA_OPTIONS`
- API server: :data:`COMMANDS_API_OPTIONS`
- controller: :data:`EVENT_CALLBACK_OPTIONS`

Parsed once into frozen values; secrets are hidden in ``--help``, in ``repr`` and in error messages.
"""
from __future__ import annotations

import argparse
import base64
import hmac
from dataclasses import dataclass
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit

import requests

from streammanager.config import ConfigError, Option, positive, resolve

AUTH_BASIC = "Basic"
AUTH_BEARER = "Bearer"
AUTH_CUSTOM = "Custom"
_AUTH_NAMES = {"basic": AUTH_BASIC, "bearer": AUTH_BEARER, "custom": AUTH_CUSTOM}


def _auth_method(text: str) -> str | None:
    lowered = text.strip().lower()
    if lowered in ("", "none"):
        return None
    if lowered not in _AUTH_NAMES:
        raise ValueError("expected Basic, Bearer or Custom")
    return _AUTH_NAMES[lowered]


def _commands_auth_method(text: str) -> str | None:
    method = _auth_method(text)
    if method == AUTH_CUSTOM:
        raise ValueError("expected Basic or Bearer")
    return method


def _http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("expected an http:// or https:// URL")
    return text


@dataclass(frozen=True)
class HttpAuth:
    """One of the specification's auth methods. ``header()`` is what we send; ``accepts()`` checks
    what we receive, in constant time."""

    method: str | None = None  # None, AUTH_BASIC, AUTH_BEARER or AUTH_CUSTOM
    user: str = ""
    password: str = ""
    token: str = ""
    custom: str = ""

    def __repr__(self) -> str:  # never print a secret
        if self.method is None:
            return "HttpAuth(none)"
        return f"HttpAuth({self.method}{', user=' + self.user if self.method == AUTH_BASIC else ''}, secret hidden)"

    def header(self) -> str | None:
        """The ``Authorization`` value to send, or None."""
        if self.method == AUTH_BASIC:
            raw = f"{self.user}:{self.password}".encode()
            return "Basic " + base64.b64encode(raw).decode("ascii")
        if self.method == AUTH_BEARER:
            return "Bearer " + self.token
        if self.method == AUTH_CUSTOM:
            return self.custom
        return None

    def accepts(self, authorization: str | None) -> bool:
        """Whether a received ``Authorization`` header carries these credentials (always, without a
        method). Compares the whole expected header in constant time."""
        expected = self.header()
        if expected is None:
            return True
        if not authorization:
            return False
        given = authorization.strip()
        scheme, _, rest = given.partition(" ")
        if self.method in (AUTH_BASIC, AUTH_BEARER) and scheme.lower() == self.method.lower():
            given = f"{self.method} {rest.strip()}"  # the scheme is case-insensitive (RFC 7235)
        return hmac.compare_digest(given.encode(), expected.encode())

    def validate(self, prefix: str, user_var: str, password_var: str, token_var: str, custom_var: str) -> None:
        if self.method == AUTH_BASIC and not (self.user and self.password):
            raise ConfigError(f"{prefix}=Basic needs {user_var} and {password_var}")
        if self.method == AUTH_BEARER and not self.token:
            raise ConfigError(f"{prefix}=Bearer needs {token_var}")
        if self.method == AUTH_CUSTOM and not self.custom:
            raise ConfigError(f"{prefix}=Custom needs {custom_var}")


@dataclass(frozen=True)
class CallbackTarget:
    """An application endpoint we call: its URL (None: do not call), auth and timeout."""

    url: str | None = None
    auth: HttpAuth = HttpAuth()
    timeout_s: float = 2.5

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def requests_auth(self) -> "requests.auth.AuthBase":
        """What to pass as requests' ``auth`` beside :meth:`headers`: given no ``auth``, requests
        replaces our ``Authorization`` with credentials of ``~/.netrc`` (or the URL's user:password) for
        the application's host, and sends them to it. This one leaves the request as :meth:`headers` made it."""
        return _AS_GIVEN

    def headers(self, **values: str) -> dict[str, str]:
        headers = dict(values)
        authorization = self.auth.header()
        if authorization is not None:
            headers["Authorization"] = authorization
        return headers


class _AsGiven(requests.auth.AuthBase):
    def __call__(self, request):
        return request


_AS_GIVEN = _AsGiven()


KEY_VERIFICATION_OPTIONS: tuple[Option, ...] = (
    Option("key_verification_url", "KEY_VERIFICATION_URL", None,
           "the application's key verification endpoint: each publish is allowed only if it answers 200 "
           "(unset: every key is accepted)", _http_url),
    Option("key_verification_auth", "KEY_VERIFICATION_AUTH", None,
           "auth of the key verification request: Basic, Bearer or Custom", _auth_method),
    Option("key_verification_auth_user", "KEY_VERIFICATION_AUTH_USER", None, "user for Basic auth"),
    Option("key_verification_password", "KEY_VERIFICATION_PASSWORD", None, "password for Basic auth",
           secret=True),
    Option("key_verification_auth_token", "KEY_VERIFICATION_AUTH_TOKEN", None, "token for Bearer auth",
           secret=True),
    Option("key_verification_auth_custom", "KEY_VERIFICATION_AUTH_CUSTOM", None,
           "the whole Authorization header for Custom auth", secret=True),
    Option("key_verification_timeout_s", "AGENT_KEY_VERIFICATION_TIMEOUT_S", 2.5,
           "a verification not answered within this many seconds refuses the publisher", positive(float)),
)

EVENT_CALLBACK_OPTIONS: tuple[Option, ...] = (
    Option("event_callback_url", "EVENT_CALLBACK_URL", None,
           "the application's event endpoint for stream-available and stream-closed (unset: none sent)",
           _http_url),
    Option("event_callback_auth", "EVENT_CALLBACK_AUTH", None,
           "auth of the event callbacks: Basic, Bearer or Custom", _auth_method),
    Option("event_callback_auth_user", "EVENT_CALLBACK_AUTH_USER", None, "user for Basic auth"),
    Option("event_callback_password", "EVENT_CALLBACK_PASSWORD", None, "password for Basic auth", secret=True),
    Option("event_callback_auth_token", "EVENT_CALLBACK_AUTH_TOKEN", None, "token for Bearer auth",
           secret=True),
    Option("event_callback_auth_custom", "EVENT_CALLBACK_AUTH_CUSTOM", None,
           "the whole Authorization header for Custom auth", secret=True),
    Option("event_callback_timeout_s", "SM_EVENT_CALLBACK_TIMEOUT_S", 5.0,
           "an event callback not answered within this many seconds is retried", positive(float)),
    Option("event_callback_retry_max_s", "SM_EVENT_CALLBACK_RETRY_MAX_S", 30.0,
           "retries of a failing endpoint back off from 0.5 s, doubling up to this many seconds",
           positive(float)),
)

COMMANDS_API_OPTIONS: tuple[Option, ...] = (
    Option("commands_api_auth", "COMMANDS_API_AUTH", None,
           "auth required on POST /commands/...: Basic or Bearer (unset: none)", _commands_auth_method),
    Option("commands_api_auth_user", "COMMANDS_API_AUTH_USER", None, "user for Basic auth"),
    Option("commands_api_auth_password", "COMMANDS_API_AUTH_PASSWORD", None, "password for Basic auth",
           secret=True),
    Option("commands_api_auth_token", "COMMANDS_API_AUTH_TOKEN", None, "token for Bearer auth", secret=True),
)

MEDIA_OPTIONS: tuple[Option, ...] = (
    Option("media_root", "SM_MEDIA_ROOT", None,
           "shared media directory where an origin writes live HLS, recordings turned into VOD playlists "
           "and preview images (default: media/ in the agent's work directory)"),
    Option("preview_interval_s", "AGENT_PREVIEW_INTERVAL_S", 5.0,
           "an origin takes a preview image of each stream this often, seconds", positive(float)),
)


def _values(options: Sequence[Option], args: argparse.Namespace | None, env: Mapping[str, str]) -> dict[str, Any]:
    return resolve(options, args or argparse.Namespace(), env)


def key_verification_from(args: argparse.Namespace | None, env: Mapping[str, str]) -> CallbackTarget:
    v = _values(KEY_VERIFICATION_OPTIONS, args, env)
    auth = HttpAuth(v["key_verification_auth"], v["key_verification_auth_user"] or "",
                    v["key_verification_password"] or "", v["key_verification_auth_token"] or "",
                    v["key_verification_auth_custom"] or "")
    auth.validate("KEY_VERIFICATION_AUTH", "KEY_VERIFICATION_AUTH_USER", "KEY_VERIFICATION_PASSWORD",
                  "KEY_VERIFICATION_AUTH_TOKEN", "KEY_VERIFICATION_AUTH_CUSTOM")
    return CallbackTarget(v["key_verification_url"], auth, v["key_verification_timeout_s"])


@dataclass(frozen=True)
class EventCallbackSettings:
    target: CallbackTarget = CallbackTarget(timeout_s=5.0)
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0


def event_callback_from(args: argparse.Namespace | None, env: Mapping[str, str]) -> EventCallbackSettings:
    v = _values(EVENT_CALLBACK_OPTIONS, args, env)
    auth = HttpAuth(v["event_callback_auth"], v["event_callback_auth_user"] or "",
                    v["event_callback_password"] or "", v["event_callback_auth_token"] or "",
                    v["event_callback_auth_custom"] or "")
    auth.validate("EVENT_CALLBACK_AUTH", "EVENT_CALLBACK_AUTH_USER", "EVENT_CALLBACK_PASSWORD",
                  "EVENT_CALLBACK_AUTH_TOKEN", "EVENT_CALLBACK_AUTH_CUSTOM")
    return EventCallbackSettings(CallbackTarget(v["event_callback_url"], auth, v["event_callback_timeout_s"]),
                                 retry_max_s=v["event_callback_retry_max_s"])


def commands_auth_from(args: argparse.Namespace | None, env: Mapping[str, str]) -> HttpAuth:
    v = _values(COMMANDS_API_OPTIONS, args, env)
    auth = HttpAuth(v["commands_api_auth"], v["commands_api_auth_user"] or "",
                    v["commands_api_auth_password"] or "", v["commands_api_auth_token"] or "")
    auth.validate("COMMANDS_API_AUTH", "COMMANDS_API_AUTH_USER", "COMMANDS_API_AUTH_PASSWORD",
                  "COMMANDS_API_AUTH_TOKEN", "-")
    return auth


@dataclass(frozen=True)
class MediaSettings:
    media_root: str | None = None
    preview_interval_s: float = 5.0


def media_from(args: argparse.Namespace | None, env: Mapping[str, str]) -> MediaSettings:
    v = _values(MEDIA_OPTIONS, args, env)
    return MediaSettings(v["media_root"], v["preview_interval_s"])
