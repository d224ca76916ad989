"""Credentials for a real deployment: a CA, the SuperLink's TLS certificate, one key pair per hospital.

Who makes what (docs/deployment.md, section 1). By default a hospital's private keys never leave its
site: the hospital runs :func:`write_hospital_request` (`fedpriv-deploy hospital-keys`), which writes
its SuperNode key pair, its TLS key and a certificate signing request (CSR); it sends the coordinator
only the public key and the CSR. The coordinator runs :func:`make_authority` (`fedpriv-deploy
credentials`) once, registers each public key with `flwr supernode register ... --name`, and signs
each CSR with :func:`sign_request` (`fedpriv-deploy sign`), which reads the request and the CA,
never a hospital's private key. :func:`make_credentials` with hospital names (the coordinator makes
every hospital's keys too) remains for throw-away test setups.

Everything is made with `cryptography` (no hand-rolled crypto):

* a private certificate authority (ECDSA P-384, self-signed) that hospitals trust as their root;
* the SuperLink's TLS certificate, signed by that CA, with a subjectAltName for every host name or
  IP address hospitals (and the coordinator's own ServerApp) use to reach it;
* one SuperNode authentication key pair per hospital (ECDSA P-384): the private key in OpenSSH
  format (what `flower-supernode --auth-supernode-private-key` reads) and the public key as an
  OpenSSH line (what `flwr supernode register` reads);
* one TLS client certificate per hospital (clientAuth, its name as the common name), signed by the
  CA: what the coordinator's reverse proxy demands before it forwards anything to the Fleet API
  (mutual TLS, :mod:`fedpriv.deployment.proxy`; presented by `fedpriv-supernode`).

Private keys are written with mode 0600. Existing files are never overwritten unless asked.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpriv.errors import ConfigError

log = logging.getLogger(__name__)

# Always in the certificate: the coordinator's own ServerApp reaches a SuperLink listening on
# 0.0.0.0 through 127.0.0.1 (Flower rewrites bind-all addresses to loopback).
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CURVE = ec.SECP384R1


@dataclass(frozen=True)
class HospitalCredentials:
    """One hospital's files: its private key stays at the hospital, the public key goes to the coordinator."""

    name: str
    private_key: Path  # OpenSSH private key, at the hospital only
    public_key: Path  # OpenSSH public key line, at the hospital (for reference)
    registered_key: Path  # copy of the public key, at the coordinator (for `flwr supernode register`)
    ca_certificate: Path  # copy of the CA certificate, at the hospital (--root-certificates)
    tls_certificate: Path  # its TLS client certificate (fedpriv-supernode --tls-client-certificate)
    tls_key: Path  # its TLS client key, at the hospital only (fedpriv-supernode --tls-client-key)


@dataclass(frozen=True)
class Credentials:
    """Where every credential file was written (see :func:`placement` for who gets what)."""

    root: Path
    ca_key: Path  # keep offline: only needed to issue new certificates
    ca_certificate: Path  # coordinator: --ssl-ca-certfile, the flwr connection's root-certificates, the proxy's client CA
    server_certificate: Path  # coordinator: --ssl-certfile (SuperLink) and the proxy's certificate
    server_key: Path  # coordinator: --ssl-keyfile (SuperLink) and the proxy's key
    hosts: tuple[str, ...]
    hospitals: dict[str, HospitalCredentials] = field(default_factory=dict)


def check_hospital_name(name: str, key: str = "hospitals") -> str:
    """A hospital name usable as a file and folder name (letters, digits, '.', '_', '-')."""
    if not _NAME.match(name):
        raise ConfigError(key, name, "hospital names must be 1-64 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit", "use e.g. A,B,C or st-marys")
    return name


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE())


def _subject(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpriv federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=days))


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA allowed to sign end-entity certificates only (path length 0)."""
    key = _new_key()
    name = _subject("fedpriv federation CA")
    builder = _validity(x509.CertificateBuilder(), days).subject_name(name).issuer_name(name)
    certificate = (
        builder.public_key(key.public_key()).serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, certificate


def make_server_certificate(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, hosts: tuple[str, ...],
                            days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS certificate: serverAuth, with a SAN for every entry of `hosts`."""
    key = _new_key()
    builder = _validity(x509.CertificateBuilder(), days).subject_name(_subject(hosts[0])).issuer_name(ca.subject)
    certificate = (
        builder.public_key(key.public_key()).serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_alt_names(hosts), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, certificate


def make_client_certificate(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, name: str,
                            days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh key and its TLS client certificate (clientAuth only, `name` as the common name)."""
    key = _new_key()
    return key, issue_client_certificate(ca_key, ca, name, key.public_key(), days)


def issue_client_certificate(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, name: str,
                             public_key: ec.EllipticCurvePublicKey, days: int) -> x509.Certificate:
    """A hospital's TLS client certificate for `public_key`: clientAuth only, not a CA, CN=`name`."""
    builder = _validity(x509.CertificateBuilder(), days).subject_name(_subject(name)).issuer_name(ca.subject)
    return (
        builder.public_key(public_key).serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def _write(path: Path, data: bytes, *, private: bool, overwrite: bool) -> Path:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite credentials (use --force to replace them)")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    # Private keys are created 0600 from the start, never world-readable even for a moment.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_certificate(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def make_supernode_keys(name: str) -> tuple[bytes, bytes]:
    """(OpenSSH private key, OpenSSH public key line) of a fresh ECDSA P-384 key pair."""
    key = _new_key()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" fedpriv-{name}\n".encode()


def write_hospital_keys(out: Path, name: str, ca_certificate: Path, *, ca_key: ec.EllipticCurvePrivateKey,
                        ca: x509.Certificate, days: int, overwrite: bool = False) -> HospitalCredentials:
    """One hospital's key pair and TLS client certificate under OUT/hospitals/NAME; its public key
    also under OUT/coordinator."""
    check_hospital_name(name)
    private, public = make_supernode_keys(name)
    tls_key, tls_certificate = make_client_certificate(ca_key, ca, name, days)
    folder = out / "hospitals" / name
    registered = _write(out / "coordinator" / "supernode-keys" / f"{name}.pub", public, private=False,
                        overwrite=overwrite)
    ca_copy = folder / "ca.crt"
    if overwrite or not ca_copy.exists():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ca_certificate, ca_copy)
    return HospitalCredentials(
        name=name,
        private_key=_write(folder / f"{name}.key", private, private=True, overwrite=overwrite),
        public_key=_write(folder / f"{name}.pub", public, private=False, overwrite=overwrite),
        registered_key=registered,
        ca_certificate=ca_copy,
        tls_certificate=_write(folder / f"{name}-tls.crt", _pem_certificate(tls_certificate), private=False,
                               overwrite=overwrite),
        tls_key=_write(folder / f"{name}-tls.key", _pem_key(tls_key), private=True, overwrite=overwrite),
    )


def _hosts(hosts: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys([*(host.strip() for host in hosts if host.strip()), *DEFAULT_HOSTS]))


def make_authority(out: str | Path, hosts: list[str] | tuple[str, ...] = DEFAULT_HOSTS, *, days: int = 365,
                   overwrite: bool = False) -> Credentials:
    """The coordinator's side: a CA (OUT/ca/ca.key, kept offline) and the server certificate for `hosts`
    (OUT/coordinator/). No hospital key: hospitals make their own (:func:`write_hospital_request`).

    127.0.0.1 and localhost are always added to `hosts`. Existing files raise FileExistsError
    (before anything is written) unless `overwrite`.
    """
    if days < 1:
        raise ConfigError("days", days, "certificates must be valid for at least one day", "use e.g. --days 365")
    root = Path(out).expanduser().resolve()
    if not overwrite:
        _refuse_existing(root, [])
    hosts = _hosts(hosts)
    ca_key, ca = make_ca(days)
    server_key, server = make_server_certificate(ca_key, ca, hosts, days)
    coordinator = root / "coordinator"
    return Credentials(
        root=root,
        ca_key=_write(root / "ca" / "ca.key", _pem_key(ca_key), private=True, overwrite=overwrite),
        ca_certificate=_write(coordinator / "ca.crt", _pem_certificate(ca), private=False, overwrite=overwrite),
        server_certificate=_write(coordinator / "server.pem", _pem_certificate(server), private=False,
                                  overwrite=overwrite),
        server_key=_write(coordinator / "server.key", _pem_key(server_key), private=True, overwrite=overwrite),
        hosts=hosts,
    )


def make_credentials(out: str | Path, hospitals: list[str], hosts: list[str] | tuple[str, ...] = DEFAULT_HOSTS, *,
                     days: int = 365, overwrite: bool = False) -> Credentials:
    """Write a CA, the server certificate for `hosts`, and a key pair and TLS client certificate per
    hospital under `out` (the coordinator then holds every hospital's private keys: test setups only).

    127.0.0.1 and localhost are always added to `hosts`. Existing files raise FileExistsError
    (before anything is written) unless `overwrite`.
    """
    names = [check_hospital_name(name.strip()) for name in hospitals]
    if not names:
        raise ConfigError("hospitals", hospitals, "at least one hospital is needed", "use e.g. --hospitals A,B,C")
    if len(set(names)) != len(names):
        raise ConfigError("hospitals", ",".join(names), "hospital names must be unique", "give each its own name")
    if days < 1:
        raise ConfigError("days", days, "certificates must be valid for at least one day", "use e.g. --days 365")
    root = Path(out).expanduser().resolve()
    if not overwrite:
        _refuse_existing(root, names)
    credentials = make_authority(root, hosts, days=days, overwrite=overwrite)
    ca_key = serialization.load_pem_private_key(credentials.ca_key.read_bytes(), None)
    ca = x509.load_pem_x509_certificate(credentials.ca_certificate.read_bytes())
    for name in names:
        credentials.hospitals[name] = write_hospital_keys(root, name, credentials.ca_certificate, ca_key=ca_key, ca=ca,
                                                          days=days, overwrite=overwrite)
    log.info("credentials for %d hospitals written under %s", len(names), root)
    return credentials


# ------------------------------------------------------------------ hospital-owned keys


@dataclass(frozen=True)
class HospitalRequest:
    """What a hospital makes at its own site: two private keys (they stay), a public key and a CSR (they go)."""

    name: str
    folder: Path
    private_key: Path  # OpenSSH, --auth-supernode-private-key (secret, never leaves the site)
    public_key: Path  # OpenSSH line: to the coordinator, for `flwr supernode register ... --name NAME`
    tls_key: Path  # PKCS#8 PEM, --tls-client-key (secret, never leaves the site)
    certificate_request: Path  # PEM CSR (CN=NAME): to the coordinator, for `fedpriv-deploy sign`

    @property
    def tls_certificate(self) -> Path:
        """Where the certificate the coordinator signs is expected back (NAME-tls.crt next to the key)."""
        return self.folder / f"{self.name}-tls.crt"


def write_hospital_request(folder: str | Path, name: str, *, overwrite: bool = False) -> HospitalRequest:
    """A hospital's own key material under `folder`: SuperNode key pair (ECDSA P-384, OpenSSH), TLS key
    and a certificate signing request for it (CN=`name`). Private keys are written 0600."""
    check_hospital_name(name, "name")
    root = Path(folder).expanduser().resolve()
    files = {suffix: root / f"{name}{suffix}" for suffix in (".key", ".pub", "-tls.key", "-tls.csr")}
    existing = [path for path in files.values() if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; refusing to overwrite the hospital's keys (use --force to "
                              "replace them; the coordinator must then register and sign the new ones)")
    private, public = make_supernode_keys(name)
    tls_key = _new_key()
    request = (x509.CertificateSigningRequestBuilder().subject_name(_subject(name))
               .sign(tls_key, hashes.SHA384()))
    return HospitalRequest(
        name=name, folder=root,
        private_key=_write(files[".key"], private, private=True, overwrite=overwrite),
        public_key=_write(files[".pub"], public, private=False, overwrite=overwrite),
        tls_key=_write(files["-tls.key"], _pem_key(tls_key), private=True, overwrite=overwrite),
        certificate_request=_write(files["-tls.csr"], request.public_bytes(serialization.Encoding.PEM),
                                   private=False, overwrite=overwrite),
    )


def _read_pem(path: Path, what: str, fix: str, loader):
    if not path.is_file():
        raise ConfigError(what, str(path), "no such file", fix)
    try:
        return loader(path.read_bytes())
    except (ValueError, TypeError) as error:
        raise ConfigError(what, str(path), f"is not a valid PEM {what} ({error})", fix) from None


def sign_request(request: str | Path, *, ca_key: str | Path, ca_certificate: str | Path, out: str | Path,
                 days: int = 365, expected_name: str | None = None, overwrite: bool = False) -> Path:
    """The coordinator signs a hospital's CSR: a clientAuth certificate for the CSR's own public key.

    Reads the CSR and the CA only. The CSR must be validly self-signed with an ECDSA P-384 key, and
    its common name a hospital name (equal to `expected_name` when given). Nothing the CSR asks for
    besides its name and key is copied: the certificate is always clientAuth-only, never a CA.
    """
    if days < 1:
        raise ConfigError("days", days, "certificates must be valid for at least one day", "use e.g. --days 365")
    request_path = Path(request).expanduser().resolve()
    csr = _read_pem(request_path, "certificate request", "pass the NAME-tls.csr a hospital made with "
                    "`fedpriv-deploy hospital-keys`", x509.load_pem_x509_csr)
    if not csr.is_signature_valid:
        raise ConfigError("csr", str(request_path), "its signature does not match its key (altered in transit?)",
                          "ask the hospital to send its NAME-tls.csr again")
    public_key = csr.public_key()
    if not (isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, CURVE)):
        raise ConfigError("csr", str(request_path), "its key is not ECDSA P-384",
                          "make the request with `fedpriv-deploy hospital-keys`")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(names[0].value) if len(names) == 1 else ""
    if not _NAME.match(name):
        raise ConfigError("csr", str(request_path), f"its common name {name!r} is not a hospital name",
                          "make the request with `fedpriv-deploy hospital-keys --name NAME`")
    if expected_name is not None and name != expected_name:
        raise ConfigError("name", expected_name, f"the request {request_path.name} is for {name!r}",
                          "sign the request the hospital of that name sent, or pass its own name")
    key = _read_pem(Path(ca_key).expanduser(), "CA key", "pass ca/ca.key from `fedpriv-deploy credentials`",
                    lambda data: serialization.load_pem_private_key(data, None))
    ca = _read_pem(Path(ca_certificate).expanduser(), "CA certificate",
                   "pass coordinator/ca.crt from `fedpriv-deploy credentials`", x509.load_pem_x509_certificate)
    if key.public_key().public_numbers() != ca.public_key().public_numbers():
        raise ConfigError("ca-key", str(ca_key), "does not belong to the CA certificate",
                          "pass the ca.key and ca.crt made together by `fedpriv-deploy credentials`")
    certificate = issue_client_certificate(key, ca, name, public_key, days)
    return _write(Path(out).expanduser().resolve(), _pem_certificate(certificate), private=False, overwrite=overwrite)


def hospital_placement(request: HospitalRequest) -> str:
    """What the hospital keeps, what it sends to the coordinator, and what comes back."""
    return "\n".join([
        f"Hospital {request.name}: keys written under {request.folder}",
        "",
        "Keep here (secret, never copy elsewhere):",
        f"  {request.private_key}  -> fedpriv-supernode --auth-supernode-private-key",
        f"  {request.tls_key}  -> fedpriv-supernode --tls-client-key",
        "",
        "Send to the coordinator (public):",
        f"  {request.public_key}  -> flwr supernode register {request.public_key.name} <connection> "
        f"--name {request.name}",
        f"  {request.certificate_request}  -> fedpriv-deploy sign --csr {request.certificate_request.name} ...",
        "",
        "Receive from the coordinator and place here:",
        f"  {request.tls_certificate}  (the signed certificate) -> fedpriv-supernode --tls-client-certificate",
        f"  {request.folder / 'ca.crt'}  (the federation's CA certificate) -> --root-certificates",
        "Check the CA certificate's fingerprint with the coordinator over another channel "
        "(`openssl x509 -noout -fingerprint -sha256 -in ca.crt`).",
    ])


def _refuse_existing(root: Path, names: list[str]) -> None:
    """Check every target before writing any, so a refusal leaves no half-replaced set behind."""
    targets = [root / "ca" / "ca.key", *(root / "coordinator" / f for f in ("ca.crt", "server.pem", "server.key"))]
    for name in names:
        targets += [root / "coordinator" / "supernode-keys" / f"{name}.pub",
                    *(root / "hospitals" / name / f"{name}{suffix}" for suffix in (".key", ".pub", "-tls.crt", "-tls.key"))]
    existing = [path for path in targets if path.exists()]
    if existing:
        raise FileExistsError(f"{existing[0]} exists; refusing to overwrite credentials (use --force to replace them)")


def placement(credentials: Credentials) -> str:
    """Human-readable instructions: which file goes to which machine, and which stays secret."""
    lines = [
        f"Credentials written under {credentials.root}",
        "",
        "CA (keep OFFLINE; only needed to issue new certificates):",
        f"  {credentials.ca_key}  (secret)",
        "",
        f"Coordinator (SuperLink and proxy machine; certificate valid for: {', '.join(credentials.hosts)}):",
        f"  {credentials.ca_certificate}  -> flower-superlink --ssl-ca-certfile, flwr connection root-certificates, "
        "fedpriv-deploy proxy --client-ca",
        f"  {credentials.server_certificate}  -> flower-superlink --ssl-certfile, fedpriv-deploy proxy --ssl-certfile",
        f"  {credentials.server_key}  -> flower-superlink --ssl-keyfile, fedpriv-deploy proxy --ssl-keyfile  (secret)",
    ]
    for hospital in credentials.hospitals.values():
        lines.append(f"  {hospital.registered_key}  -> flwr supernode register ... --name {hospital.name}")
    if not credentials.hospitals:
        lines += [
            "",
            "Hospitals make their own keys: each runs `fedpriv-deploy hospital-keys --name NAME --out DIR` and sends",
            "you NAME.pub and NAME-tls.csr. Register the first (`flwr supernode register NAME.pub <connection> --name NAME`),",
            f"sign the second (`fedpriv-deploy sign --csr NAME-tls.csr --ca-key {credentials.ca_key} "
            f"--ca-cert {credentials.ca_certificate} --out NAME-tls.crt`), and send back NAME-tls.crt and ca.crt.",
        ]
    for hospital in credentials.hospitals.values():
        lines += [
            "",
            f"Hospital {hospital.name} (its SuperNode machine only):",
            f"  {hospital.ca_certificate}  -> fedpriv-supernode --root-certificates",
            f"  {hospital.private_key}  -> fedpriv-supernode --auth-supernode-private-key  (secret, never copy elsewhere)",
            f"  {hospital.tls_certificate}  -> fedpriv-supernode --tls-client-certificate",
            f"  {hospital.tls_key}  -> fedpriv-supernode --tls-client-key  (secret, never copy elsewhere)",
            f"  {hospital.public_key}  (public; the coordinator registers its copy)",
        ]
    return "\n".join(lines)
