"""streammanager.deadline against real HTTP and HTTPS endpoints on loopback: an application's key
verification and event callback URLs are https in production."""
from __future__ import annotations

import datetime
import http.server
import ipaddress
import ssl
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from streammanager.deadline import DeadlineExceeded, post_within, watched_session


def _certificate(tmp_path):
    """A self-signed certificate for 127.0.0.1: (cert file, key file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@pytest.fixture(params=["http", "https"])
def endpoint(request, tmp_path):
    """(url, CA file or True, settings): a server answering 200; ``settings["trickle_s"]`` spreads its
    answer over that long, a byte at a time."""
    settings = {"trickle_s": 0.0}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # noqa: N802 (http.server's naming)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            if not settings["trickle_s"]:
                self.wfile.write(raw)
                return
            for n in range(len(raw)):
                self.wfile.write(raw[n:n + 1])
                time.sleep(settings["trickle_s"] / len(raw))

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    verify: str | bool = True
    if request.param == "https":
        cert_file, key_file = _certificate(tmp_path)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        verify = str(cert_file)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"{request.param}://127.0.0.1:{server.server_address[1]}/hook", verify, settings
    server.shutdown()
    server.server_close()


def test_a_prompt_answer_comes_back_and_the_connection_is_kept_for_the_next(endpoint):
    url, verify, _ = endpoint
    with watched_session() as http:
        for _ in range(3):
            response = post_within(http, url, 5.0, data=b"", verify=verify)
            assert (response.status_code, response.content) == (200, b"ok")


def test_an_answer_trickled_out_past_the_deadline_is_no_answer(endpoint):
    url, verify, settings = endpoint
    settings["trickle_s"] = 3.0  # each byte well within the deadline: the whole answer takes 3 s
    with watched_session() as http:
        with pytest.raises(DeadlineExceeded):
            post_within(http, url, 1.0, data=b"", verify=verify)
        settings["trickle_s"] = 0.0
        assert post_within(http, url, 5.0, data=b"", verify=verify).status_code == 200  # and the next works
