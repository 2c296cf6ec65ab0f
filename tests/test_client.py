"""serverAPI's own HTTP client reads what a proxy in front of the server may send (a chunked
body, an interim 100, a body up to the close) and refuses what is not HTTP in one line. The
peer here is a loopback socket that answers canned bytes: the real server never sends these."""
import os
import resource
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest

import serverAPI

OK_BODY = b'{"status": "ok"}'


def canned(answers, tls=None):
    """A loopback listener answering each connection's request with the next canned bytes,
    then closing it (through `tls`, an SSLContext, if given); its URL."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        for answer in answers:
            conn, _ = listener.accept()
            if tls:
                try:
                    conn = tls.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError):
                    continue        # the client refused our certificate
            with conn:
                conn.settimeout(5)
                got = b""
                while b"\r\n\r\n" not in got:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    got += chunk
                conn.sendall(answer)
        listener.close()
    threading.Thread(target=serve, daemon=True).start()
    return f"{'https' if tls else 'http'}://127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\n{\"stat\r\na;x=1\r\nus\": \"ok\"}\r\n0\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n" + OK_BODY,
    b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + OK_BODY,
    b"HTTP/1.1 200 OK\nContent-Length: 16\n\n" + OK_BODY,
])
def test_the_client_reads_every_framing_a_proxy_may_use(answer):
    client = serverAPI.Client(canned([answer]), token="t", retry_for=0)
    assert client.call("GET", "/api/health") == {"status": "ok"}


def test_a_request_is_said_sent_once_and_only_on_a_connection_the_server_still_holds():
    """A kept connection the server has closed is found before a request goes out on it, so
    `sent()` is called once, for the request the server got (a pilot starts its reserve then)."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n" + OK_BODY
    client = serverAPI.Client(canned([answer, answer]), token="t", retry_for=0)
    assert client.call("GET", "/api/health") == {"status": "ok"}
    time.sleep(0.2)         # the listener has closed the connection the client keeps
    said = []
    assert client.call("POST", "/api/jobs/x/report", {}, sent=lambda sock: said.append("sent")) == {"status": "ok"}
    assert said == ["sent"]


def test_a_process_with_descriptors_past_1023_still_reuses_its_kept_connection():
    """A busy client (a pilot with many files open) gets descriptors past 1023, where select()
    cannot look: its kept connection is still checked before a request goes out, and reused
    (the peer answers on one connection only)."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n" + OK_BODY
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    accepted = []

    def serve_one_connection():
        conn, _ = listener.accept()
        accepted.append(conn)
        with conn:
            conn.settimeout(5)
            for _ in range(2):
                got = b""
                while b"\r\n\r\n" not in got:
                    got += conn.recv(65536)
                conn.sendall(answer)
    threading.Thread(target=serve_one_connection, daemon=True).start()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        client = serverAPI.Client(f"http://127.0.0.1:{listener.getsockname()[1]}", token="t", retry_for=0,
                                  timeout=5)
        assert [client.call("GET", "/api/health") for _ in range(2)] == [{"status": "ok"}] * 2
        assert len(accepted) == 1 and client.pool[0].sock.fileno() > 1023
        client.close()
    finally:
        for fd in held:
            os.close(fd)
        listener.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("answer,said", [
    (b"SSH-2.0-OpenSSH_8.7\r\n", "not an HTTP/1.x answer"),
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 70000 + b"\r\n\r\n", "over 64 KiB"),
    (b"HTTP/1.1 200 OK\r\n" + b"X-Many: 1\r\n" * 101 + b"\r\n", "more than 100 header lines"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n{}", "ended after 2 of 99 bytes"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n{}", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n{}", "Content-Length"),
    (b"HTTP/1.1 100 Continue\r\n\r\n" * 50, "interim"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
])
def test_an_answer_that_is_not_http_is_one_line_not_a_traceback(answer, said):
    client = serverAPI.Client(canned([answer]), token="t", retry_for=0)
    with pytest.raises(serverAPI.P3SError, match=said) as caught:
        client.call("GET", "/api/health")
    assert "\n" not in str(caught.value) and caught.value.status is None


def test_the_client_speaks_https_to_a_server_behind_tls_and_checks_its_certificate(tmp_path, monkeypatch):
    """A production server behind a TLS proxy: the same client, the certificate verified."""
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n" + OK_BODY
    started = time.monotonic()
    with pytest.raises(serverAPI.InputError, match="certificate is not trusted .*SSL_CERT_FILE"):
        serverAPI.Client(canned([answer], tls), token="t", retry_for=30).call("GET", "/api/health")
    assert time.monotonic() - started < 10, "a certificate that cannot verify was retried"
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))      # now the client trusts it
    assert serverAPI.Client(canned([answer], tls), token="t", retry_for=0).call("GET", "/api/health") == {"status": "ok"}
