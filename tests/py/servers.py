"""Local test servers for Kiln's network tests, on the host's loopback only.

Serves DIR over plain HTTP and over HTTPS (a fresh self-signed certificate for
127.0.0.1 and localhost, written to DIR/../ca.pem) on ephemeral ports, prints
{"http": PORT, "https": PORT} as one JSON line, and serves until stdin closes.

A second virtual host, admin.internal, answers every GET with "admin vhost"; every
request that arrives is appended to DIR/../requests.log as "HOST-HEADERS PATH", so
a test can tell what reached the server and with which Host.
"""
import datetime
import functools
import http.server
import ipaddress
import json
import os
import ssl
import sys
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed(cert_path, key_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kiln test server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


class Quiet(http.server.SimpleHTTPRequestHandler):
    request_log = None
    log_lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_GET(self):
        hosts = self.headers.get_all("Host") or []
        with self.log_lock, open(self.request_log, "a") as log:
            log.write(f"{','.join(hosts)} {self.path}\n")
        if any(h.split(":")[0].lower() == "admin.internal" for h in hosts):
            body = b"admin vhost\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()


def main():
    root = os.path.abspath(sys.argv[1])
    parent = os.path.dirname(root)
    cert, key = os.path.join(parent, "ca.pem"), os.path.join(parent, "server.key")
    self_signed(cert, key)
    Quiet.request_log = os.path.join(parent, "requests.log")
    handler = functools.partial(Quiet, directory=root)
    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    tls = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    tls.socket = context.wrap_socket(tls.socket, server_side=True)
    for server in (plain, tls):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print(json.dumps({"http": plain.server_address[1], "https": tls.server_address[1]}), flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
