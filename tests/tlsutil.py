"""TLS files for client tests: a throwaway CA (trustme) and a server certificate it signed.

A plain helper rather than a fixture, so test modules need no fixture imports
(which linters read as redefinitions); each client test module wraps it in a
three-line fixture. tests/test_tls.py keeps its own for the server side.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import trustme


class TLSFiles(NamedTuple):
    cert: str  # server certificate chain and key in one PEM: --tls-cert
    ca: str  # the CA that signed it: ca= / --ca

    @property
    def server_args(self) -> tuple[str, str]:
        return ("--tls-cert", self.cert)


def make_tls_files(directory: Path) -> TLSFiles:
    """Write a new CA and a certificate for 127.0.0.1 and localhost under ``directory``."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = TLSFiles(str(directory / "server.pem"), str(directory / "ca.pem"))
    cert.private_key_and_cert_chain_pem.write_to_path(files.cert)
    ca.cert_pem.write_to_path(files.ca)
    return files
