"""Servers no real part can stand in for here: a registry token server, a CDN, an upstream
with the referrers API, faults (a server that does not speak HTTP, an upstream that only
challenges) and a slow link.

They speak the real protocols: the token server issues JWTs that a real `registry` with
`auth: token` accepts (RS256, an x5c chain ending in the rootcertbundle certificate, see the
field notes §8); the CDN serves a registry's storage files the way its `redirect` storage
middleware points clients at them. Each runs in a thread of the test process and record what
they were asked, so tests can count token requests and check headers.
"""

from __future__ import annotations

import base64
import datetime
import json
import re
import socket
import socketserver
import ssl
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from .parts import OCI_INDEX


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _certificate(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


def self_signed_tls(directory: Path) -> ssl.SSLContext:
    """A server-side TLS context with a new self-signed certificate (its files in `directory`)."""
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _certificate("regcache test server", key, "regcache test server", key, ca=False)
    (directory / "server.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (directory / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "server.pem", directory / "server.key")
    return context


class _Server:
    """A ThreadingHTTPServer on loopback (a subclass may start another socketserver), in a daemon thread."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.port, self.host = port, host
        self.url = f"http://{host}:{port}"
        self._server: ThreadingHTTPServer | None = None

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        raise NotImplementedError

    def start(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.handle(self)

            do_HEAD = do_GET

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _reply(handler: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str = "application/json") -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)


class TokenServer(_Server):
    """Docker Hub's token protocol: GET /token?service=..&scope=.. with Basic credentials.

    Users with the right password get every action they ask for; anyone else gets 401.
    """

    SERVICE = "regcache-test-upstream"
    ISSUER = "regcache-test-token-server"

    def __init__(self, root: Path, port: int, users: dict[str, str], expires_in: int = 600) -> None:
        super().__init__(port)
        self.users, self.expires_in = users, expires_in
        self.requests: list[tuple[str | None, tuple[str, ...]]] = []  # (user or None if refused, scopes)
        self.issued: list[str] = []
        root.mkdir(parents=True, exist_ok=True)
        root_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        root_cert = _certificate("regcache test token root", root_key, "regcache test token root", root_key, ca=True)
        self._leaf = _certificate("regcache test token signer", self._key, "regcache test token root", root_key, ca=False)
        self.root_bundle = root / "token-root.pem"
        self.root_bundle.write_bytes(root_cert.public_bytes(serialization.Encoding.PEM))

    def registry_auth(self) -> dict:
        """The `auth` section of a registry configuration that trusts this server's tokens."""
        return {"token": {"realm": f"{self.url}/token", "service": self.SERVICE, "issuer": self.ISSUER,
                          "rootcertbundle": str(self.root_bundle)}}

    def bearer(self, user: str, scope: str) -> str:
        """An Authorization header for `user` and one scope, as this server would issue it."""
        return f"Bearer {self._token(user, (scope,))}"

    def granted_requests_for(self, scope: str) -> int:
        return sum(scope in scopes for user, scopes in self.requests if user is not None)

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        query = parse_qs(urlsplit(handler.path).query)
        scopes = tuple(query.get("scope", []))
        user = self._user(handler.headers.get("Authorization", ""))
        self.requests.append((user, scopes))
        if user is None:
            _reply(handler, 401, b'{"details":"incorrect username or password"}')
            return
        token = self._token(user, scopes)
        self.issued.append(token)
        _reply(handler, 200, json.dumps({"token": token, "expires_in": self.expires_in}).encode())

    def _user(self, authorization: str) -> str | None:
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            return None
        user, _, password = base64.b64decode(encoded).decode().partition(":")
        return user if self.users.get(user) == password else None

    def _token(self, user: str, scopes: tuple[str, ...]) -> str:
        access = []
        for scope in scopes:
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256",
                  "x5c": [base64.b64encode(self._leaf.public_bytes(serialization.Encoding.DER)).decode()]}
        claims = {"iss": self.ISSUER, "sub": user, "aud": self.SERVICE, "iat": now, "nbf": now - 1,
                  "exp": now + self.expires_in, "jti": uuid.uuid4().hex, "access": access}
        signed = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self._key.sign(signed.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signed}.{_b64url(signature)}"


class Redirector(_Server):
    """Answers every GET with a 302 to `location`; records the Authorization each request carried."""

    def __init__(self, port: int, location: str, host: str = "127.0.0.1") -> None:
        super().__init__(port, host)
        self.location = location
        self.authorizations: list[str | None] = []

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        self.authorizations.append(handler.headers.get("Authorization"))
        handler.send_response(302)
        handler.send_header("Location", self.location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()


class Cdn(_Server):
    """Serves a registry's storage folder, as its `redirect` middleware's baseurl; records headers."""

    def __init__(self, storage: Path, port: int) -> None:
        super().__init__(port)
        self.storage = storage
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)

    def registry_middleware(self) -> dict:
        """The `middleware` section of a registry configuration that redirects blob requests here."""
        return {"storage": [{"name": "redirect", "options": {"baseurl": self.url}}]}

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        path = urlsplit(handler.path).path
        self.requests.append((handler.command, path, handler.headers.get("Authorization")))
        file = (self.storage / path.lstrip("/")).resolve()
        if self.storage.resolve() not in file.parents or not file.is_file():
            _reply(handler, 404, b"not found", "text/plain")
            return
        _reply(handler, 200, file.read_bytes(), "application/octet-stream")


class NotHttp(_Server):
    """A server that answers every connection with a line that is not HTTP (an SSH banner, as a
    wrong port gives) and records the first line it was sent."""

    BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.requests: list[str] = []  # request lines, e.g. "GET /v2/ HTTP/1.1"

    def start(self) -> "NotHttp":
        owner = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                self.connection.settimeout(5)
                owner.requests.append(self.rfile.readline(8192).decode("latin-1").strip())
                self.wfile.write(owner.BANNER)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer((self.host, self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self


class Challenger(_Server):
    """A registry's `GET /v2/` as Docker Hub answers it: 401 with a Bearer challenge naming a
    token realm (any server: see NotHttp). Records the paths it was asked."""

    def __init__(self, port: int, realm: str) -> None:
        super().__init__(port)
        self.realm = realm
        self.paths: list[str] = []

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        self.paths.append(handler.path)
        handler.send_response(401)
        handler.send_header("WWW-Authenticate", f'Bearer realm="{self.realm}",service="registry.test"')
        handler.send_header("Content-Type", "application/json")
        body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)


class ReferrersRegistry(_Server):
    """An upstream with the OCI 1.1 referrers API (which no registry on these machines has), behind
    Bearer tokens from a TokenServer: `GET /v2/<name>/referrers/<digest>[?artifactType=]` answers
    an image index of the manifests whose subject is that digest (an empty one when there are
    none), filtered by artifactType with `OCI-Filters-Applied`. Records (path, Authorization)."""

    def __init__(self, port: int, tokens: TokenServer) -> None:
        super().__init__(port)
        self.tokens = tokens
        self.referrers: dict[tuple[str, str], list[dict]] = {}  # (repository, subject digest) -> descriptors
        self.requests: list[tuple[str, str | None]] = []

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        authorization = handler.headers.get("Authorization")
        self.requests.append((handler.path, authorization))
        match = re.fullmatch(r"/v2/(.+)/referrers/(sha256:[a-f0-9]{64})", parts.path)
        scope = f",scope=\"repository:{match[1]}:pull\"" if match else ""
        if authorization is None or authorization.removeprefix("Bearer ") not in self.tokens.issued:
            handler.send_response(401)
            handler.send_header("WWW-Authenticate", f'Bearer realm="{self.tokens.url}/token",service="{TokenServer.SERVICE}"{scope}')
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        if not match:
            _reply(handler, 200 if parts.path == "/v2/" else 404, b"{}")
            return
        manifests = self.referrers.get((match[1], match[2]), [])
        wanted = parse_qs(parts.query).get("artifactType")
        if wanted:
            manifests = [m for m in manifests if m.get("artifactType") in wanted]
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", OCI_INDEX)
        if wanted:
            handler.send_header("OCI-Filters-Applied", "artifactType")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)


class SlowLink:
    """A TCP relay to `target_port` that passes answers at `rate` bytes/s: a distant upstream
    (this kernel has no netem), so a test can act while a blob is halfway through (setting `rate`
    lower meanwhile keeps it there however slowly the test runs: transfers under way follow it
    from their next chunk). When the target dies, the relay closes the client's side too, as a
    link to a dead host ends."""

    CHUNK = 64 << 10

    def __init__(self, port: int, target_port: int, rate: float, host: str = "127.0.0.1", bind: str | None = None) -> None:
        """Relays `host`:`port` to `host`:`target_port`, listening on `bind` (default `host`; "" for
        every address, one not there yet too)."""
        self.port, self.target_port, self.rate, self.host = port, target_port, rate, host
        self.bind = host if bind is None else bind
        self.url = f"http://{host}:{port}"
        self._listener: socket.socket | None = None

    def start(self) -> "SlowLink":
        self._listener = socket.create_server((self.bind, self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._listener:
            # close() alone leaves the port listening while the accept thread waits in accept()
            # (Linux); shutdown wakes it, so the next test can bind the port.
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                target = socket.create_connection((self.host, self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            target.settimeout(None)
            threading.Thread(target=self._pipe, args=(client, target, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(target, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, slow: bool) -> None:
        try:
            while chunk := source.recv(self.CHUNK):
                sink.sendall(chunk)
                if slow:
                    time.sleep(len(chunk) / self.rate)
        except OSError:
            pass
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()
