"""TLS, mutual TLS and tokens from Python, against real loaders, with certificates made by
trustme (a test CA, a server certificate for localhost, a client certificate)."""

import os
import subprocess
import time

import numpy as np
import pytest
import trustme

import conveyor
from conftest import binary, write_chess_like

N = 500


@pytest.fixture
def pki(tmp_path):
    ca = trustme.CA()
    server = ca.issue_cert("localhost")
    client = ca.issue_cert("trainer")
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "server-cert", "server-key", "client-cert", "client-key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server.cert_chain_pems[0].write_to_path(str(paths["server-cert"]))
    server.private_key_pem.write_to_path(str(paths["server-key"]))
    client.cert_chain_pems[0].write_to_path(str(paths["client-cert"]))
    client.private_key_pem.write_to_path(str(paths["client-key"]))
    return paths


def epoch_indices(ds):
    return np.sort(np.concatenate([batch["__index__"] for batch in ds]))


def test_tls_with_the_loaders_ca_streams_an_epoch_and_the_system_roots_refuse_it(tmp_path, start_loader, pki):
    write_chess_like(tmp_path / "c", N)
    loader = start_loader({"c": tmp_path / "c"}, "--tls-cert", pki["server-cert"], "--tls-key", pki["server-key"])
    https = [f"https://localhost:{loader.port}"]
    ds = conveyor.StreamingDataset(https, "c", batch_size=64, tls_ca=pki["ca"], unavailable_timeout=10)
    assert np.array_equal(epoch_indices(ds), np.arange(N))
    assert "c" in conveyor.datasets(https, tls_ca=str(pki["ca"]))
    with pytest.raises(conveyor.AuthenticationError, match="(?i)certificate"):  # at once, by cause
        conveyor.StreamingDataset(https, "c", unavailable_timeout=30)


def test_mutual_tls_needs_the_client_certificate(tmp_path, start_loader, pki):
    write_chess_like(tmp_path / "c", N)
    loader = start_loader(
        {"c": tmp_path / "c"},
        "--tls-cert", pki["server-cert"], "--tls-key", pki["server-key"], "--tls-client-ca", pki["ca"],
    )
    https = [f"https://localhost:{loader.port}"]
    ds = conveyor.StreamingDataset(
        https, "c", batch_size=64, tls_ca=pki["ca"], tls_cert=pki["client-cert"], tls_key=pki["client-key"]
    )
    assert np.array_equal(epoch_indices(ds), np.arange(N))
    # Refusals are reported by cause at once, not after unavailable_timeout.
    started = time.monotonic()
    with pytest.raises(conveyor.AuthenticationError, match="requires client certificates.*give tls_cert and tls_key"):
        conveyor.StreamingDataset(https, "c", tls_ca=pki["ca"], unavailable_timeout=30)
    other_ca = trustme.CA()
    other_ca.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    with pytest.raises(conveyor.AuthenticationError, match="invalid peer certificate: UnknownIssuer"):
        conveyor.StreamingDataset(https, "c", tls_ca=tmp_path / "other-ca.pem", tls_cert=pki["client-cert"],
                                  tls_key=pki["client-key"], unavailable_timeout=30)
    assert time.monotonic() - started < 10
    with pytest.raises(conveyor.InvalidSettingsError, match="tls_cert and tls_key go together"):
        conveyor.StreamingDataset(https, "c", tls_ca=pki["ca"], tls_cert=pki["client-cert"])


def test_tokens_right_from_the_argument_or_the_environment_wrong_and_missing(tmp_path, start_loader, monkeypatch):
    write_chess_like(tmp_path / "c", N)
    tokens = tmp_path / "tokens"
    tokens.write_text("# trainers\nright-token\n")
    loader = start_loader({"c": tmp_path / "c"}, "--auth-token-file", tokens)
    addrs = [loader.addr]
    ds = conveyor.StreamingDataset(addrs, "c", batch_size=64, auth_token="right-token")
    assert np.array_equal(epoch_indices(ds), np.arange(N))
    monkeypatch.setenv("CONVEYOR_AUTH_TOKEN", "right-token")
    assert np.array_equal(epoch_indices(conveyor.StreamingDataset(addrs, "c", batch_size=64)), np.arange(N))
    with pytest.raises(conveyor.AuthenticationError, match="does not accept the token") as wrong:
        conveyor.StreamingDataset(addrs, "c", auth_token="wrong-token")
    assert "wrong-token" not in str(wrong.value) and "right-token" not in str(wrong.value)
    monkeypatch.delenv("CONVEYOR_AUTH_TOKEN")
    with pytest.raises(conveyor.AuthenticationError, match="requires a token"):
        conveyor.datasets(addrs)


def test_a_flood_of_refused_calls_writes_a_line_a_second_not_a_line_a_call(tmp_path):
    write_chess_like(tmp_path / "c", 100)
    (tmp_path / "tokens").write_text("right\n")
    loader = subprocess.Popen([binary("loader-server"), "--listen", "127.0.0.1:0", "--dataset", f"c={tmp_path / 'c'}",
                               "--auth-token-file", str(tmp_path / "tokens")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, LOADER_LOG="warn"))
    try:
        addr = loader.stdout.readline().split()[-1]
        started = time.monotonic()
        for _ in range(60):
            with pytest.raises(conveyor.AuthenticationError):
                conveyor.datasets([addr], auth_token="wrong", unavailable_timeout=5)
        seconds = time.monotonic() - started
    finally:
        loader.terminate()
        _, stderr = loader.communicate(timeout=30)
    lines = [line for line in stderr.splitlines() if "refused an unauthenticated call" in line]
    # 60 refused connects (each one call or more): a line per second at most, each saying how
    # many it left out (LogThrottle's unit test checks the count).
    assert 1 <= len(lines) <= seconds + 2 and len(lines) < 30, f"{len(lines)} lines in {seconds:.1f}s"
    assert all("not_logged=" in line for line in lines), lines
