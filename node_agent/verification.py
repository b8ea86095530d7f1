"""Publish key verification against the application (``KEY_VERIFICATION_URL``).

A POST with an empty body and the headers ``x-streaming-channel``, ``x-streaming-key``, ``x-user-ip``
and ``Authorization`` (per ``KEY_VERIFICATION_AUTH``). Only a 200 answer allows the publisher; any
other status, a redirect, a connection error or no complete answer within the timeout refuses it. Without a URL
every key is accepted. The key is never logged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import requests

from streammanager.coordinator_config import CallbackTarget
from streammanager.deadline import post_within, watched_session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str


class KeyVerifier:
    def __init__(self, target: CallbackTarget):
        self.target = target

    @property
    def enabled(self) -> bool:
        return self.target.enabled

    def verify(self, channel: str, key: str, user_ip: str) -> Verdict:
        if not self.target.enabled:
            return Verdict(True, "no KEY_VERIFICATION_URL: every key is accepted")
        # the key as the publisher's bytes (UTF-8): http.client would encode a str as latin-1, which
        # failed with a 500 on any key (or address) outside latin-1 and sent others re-encoded
        headers = {name: value.encode("utf-8") for name, value in self.target.headers(**{
            "x-streaming-channel": channel, "x-streaming-key": key, "x-user-ip": user_ip}).items()}
        try:
            # the timeout bounds the whole request: a verifier that trickled its 200 out a byte at a time
            # was waited for (and obeyed) long after nginx had given up on the publish hook
            with watched_session() as http:  # a connection per call, as requests.post makes
                response = post_within(http, self.target.url, self.target.timeout_s, data=b"", headers=headers,
                                       auth=self.target.requests_auth(), allow_redirects=False)
                status = response.status_code
        except ValueError as exc:  # requests' InvalidHeader (a CR/LF or leading space in the key) is one too
            log.warning("key verification not sent (%s: the key or address cannot be an HTTP header value): "
                        "publisher refused", type(exc).__name__, extra={"stream": channel, "action": "publish"})
            return Verdict(False, "the stream key cannot be sent to the key verification endpoint")
        except requests.RequestException as exc:
            log.warning("key verification got no answer (%s): publisher refused", type(exc).__name__,
                        extra={"stream": channel, "action": "publish"})
            return Verdict(False, "the key verification endpoint did not answer")
        if status != 200:
            log.info("key verification answered %d: publisher refused", status,
                     extra={"stream": channel, "action": "publish", "status": status})
            return Verdict(False, f"stream key refused (verification answered {status})")
        return Verdict(True, "key accepted")
