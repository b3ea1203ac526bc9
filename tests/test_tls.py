"""TLS on the same single-threaded loop, with a throwaway CA (trustme)."""

import socket
import ssl

import pytest
import trustme
from conftest import RawClient, reply_count

from muxserver import protocol as P


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def tls_server(server_factory, ca, tmp_path):
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(cert_path), append=True)
    cert.private_key_pem.write_to_path(str(key_path))
    return server_factory("--tls-cert", str(cert_path), "--tls-key", str(key_path))


def client_context(ca):
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def test_tls_end_to_end(tls_server, ca):
    a = RawClient(tls_server.address, ssl_context=client_context(ca))
    b = RawClient(tls_server.address, ssl_context=client_context(ca))
    a.hello("a")
    b.hello("b")
    a.join("r")
    b.join("r")
    # Many frames in one TLS record stream: exercises data already decrypted
    # inside the SSL object, which raises no readiness event of its own.
    a.send_raw(b"".join(P.encode(P.Emit(0, 0, "r", "e", b"%d" % i)) for i in range(500)))
    got = [b.recv_type(P.Event).payload for _ in range(500)]
    assert got == [b"%d" % i for i in range(500)]
    big = b"z" * 300_000  # bigger than one TLS record and one socket buffer
    assert reply_count(a.emit_room("r", "big", big)) == 1
    assert b.recv_type(P.Event).payload == big


def test_plain_client_against_tls_port_is_closed(tls_server, ca):
    plain = RawClient(tls_server.address)
    plain.send(P.Hello(1, "/", "plain", ""))
    with pytest.raises((EOFError, ConnectionResetError)):
        plain.recv(timeout=10)


def test_failed_handshake_does_not_disturb_others(tls_server, ca):
    good = RawClient(tls_server.address, ssl_context=client_context(ca))
    good.hello("good")
    good.join("r")
    untrusting = ssl.create_default_context()  # does not trust our CA
    with pytest.raises(ssl.SSLError):
        RawClient(tls_server.address, ssl_context=untrusting)
    raw = socket.create_connection(tls_server.address)
    raw.sendall(b"\x16\x03\x01\x00\x05hello")  # a broken ClientHello
    raw.close()
    good.send(P.Ping(7))
    assert good.recv() == P.ServerPong(7)
    late = RawClient(tls_server.address, ssl_context=client_context(ca))
    assert late.hello("late").nick == "late"
