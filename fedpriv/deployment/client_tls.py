"""`fedpriv-supernode`: Flower's own `flower-supernode`, presenting the hospital's TLS client certificate.

Hospitals reach the coordinator only through a reverse proxy that demands a client certificate
issued by the federation's CA (mutual TLS, :mod:`fedpriv.deployment.proxy`). Flower 1.42's
SuperNode verifies the server but has no option to present a certificate of its own, so this entry
point takes two extra flags, builds the TLS context with Python's `ssl` module (the CA to trust,
the hospital's certificate and key to present), hands it to Flower's Fleet client, and then runs
`flower-supernode` unchanged with every other flag:

    fedpriv-supernode --tls-client-certificate A-tls.crt --tls-client-key A-tls.key \\
        --superlink link.example.org:8443 --root-certificates ca.crt ...

Everything else (node authentication, isolation, node config) is Flower's own code. The one hook
is `FleetHttpClient.from_server_address` (flwr/supernode/fleet_http_client.py, inherited from
flwr/supercore/protobuf/client.py), which the SuperNode's Fleet connection
(flwr/supernode/fleet_http_connection.py) calls once with the address, `insecure` and the root
certificates. The replacement builds the same client with a context that also presents the
certificate; like Flower's it trusts only the given root certificates (the system's when none).
"""

from __future__ import annotations

import argparse
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

CERTIFICATE_FLAG, KEY_FLAG = "--tls-client-certificate", "--tls-client-key"


def client_context(root_certificates: str | Path | bytes | None, certificate: Path, key: Path) -> ssl.SSLContext:
    """A TLS client context that trusts only `root_certificates` and presents `certificate` (mutual TLS).

    `root_certificates` is what Flower passes on: PEM bytes, a file path, or None (the system's CAs).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server's certificate and name
    if isinstance(root_certificates, bytes):
        context.load_verify_locations(cadata=root_certificates.decode("ascii"))
    elif root_certificates is not None:
        context.load_verify_locations(cafile=str(Path(root_certificates).expanduser()))
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    context.load_cert_chain(str(certificate), str(key))
    return context


def present_client_certificate(certificate: Path, key: Path) -> None:
    """Make every Fleet connection of this process present `certificate` (checked to load right now)."""
    from flwr.supernode.fleet_http_client import FleetHttpClient

    client_context(None, certificate, key)  # a wrong path or a key that does not match fails here, clearly

    def with_client_certificate(cls, server_address, insecure, root_certificates, interceptors, **kwargs):
        if insecure:
            raise ValueError("fedpriv-supernode presents a TLS client certificate, which needs TLS: "
                             "drop --insecure")
        return cls(f"https://{server_address}", interceptors=interceptors,
                   verify=client_context(root_certificates, certificate, key), **kwargs)

    FleetHttpClient.from_server_address = classmethod(with_client_certificate)


def split_arguments(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """(the two client-certificate flags, every other argument for flower-supernode)."""
    parser = argparse.ArgumentParser(
        prog="fedpriv-supernode", add_help=False,
        description="flower-supernode, presenting a TLS client certificate to the coordinator's proxy")
    parser.add_argument(CERTIFICATE_FLAG, dest="certificate", type=Path, required=True,
                        help="the hospital's TLS client certificate (PEM, signed by the federation's CA)")
    parser.add_argument(KEY_FLAG, dest="key", type=Path, required=True, help="its private key (PEM)")
    return parser.parse_known_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (`fedpriv-supernode`)."""
    args, rest = split_arguments(sys.argv[1:] if argv is None else argv)
    if "--insecure" in rest:
        sys.exit("fedpriv-supernode: --insecure cannot be combined with a TLS client certificate; "
                 "use flower-supernode for a plain connection")
    for path in (args.certificate, args.key):
        if not path.is_file():
            sys.exit(f"fedpriv-supernode: {path} not found (the hospital's TLS client certificate and key, "
                     "NAME-tls.crt and NAME-tls.key from `fedpriv-deploy credentials`)")
    try:
        present_client_certificate(args.certificate, args.key)
    except (ssl.SSLError, OSError) as error:
        sys.exit(f"fedpriv-supernode: cannot use {args.certificate} with {args.key}: {error}")
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()
