"""The coordinator's reverse proxy: nginx, mutual TLS, and only the Fleet API forwarded.

Flower 1.42's SuperLink serves the Fleet API (what SuperNodes use), the Control API (`flwr run`,
`flwr supernode register/unregister/list`, `flwr ls`) and the Runtime API (the ServerApp's) on one
HTTP(S) port, as the paths `/v1/fleet/...`, `/v1/control/...` and `/v1/runtime/...`, and open-source
Flower has no authentication on the Control API. So the SuperLink listens on loopback only, and
hospitals reach it through nginx (Debian's package), which:

* terminates TLS on the public port with the federation's server certificate;
* demands a client certificate issued by the federation's CA (`ssl_verify_client on`); a
  connection without one, or with one from another CA, gets nginx's own 400 and nothing is forwarded;
* forwards only `POST /v1/fleet/...` (every Fleet call is a POST), on the normalised path, and
  answers 403 to everything else (Control, Runtime, `/health`, other methods);
* talks to the SuperLink over TLS on loopback, verifying its certificate against the same CA.
  The SuperLink keeps its own TLS because `flower-superlink --enable-supernode-auth` refuses to
  start without it (flwr/superlink/cli/flower_superlink.py), and SuperNode authentication (a
  signature over a timestamp in `flwr-*` headers, not tied to the TLS channel) still decides which
  registered hospital a request comes from.

Flower's HTTP clients (httpx) and the SuperLink (uvicorn) speak HTTP/1.1, and every Fleet call is a
unary POST (no gRPC, no streaming), so plain `proxy_pass` over HTTP/1.1 with keep-alive fits. Array
chunks travel in bodies of up to 5 MiB (`FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE`), above nginx's 1 MiB
default, hence `client_max_body_size`. Bodies are streamed, never buffered to disk
(`proxy_request_buffering off`, `proxy_buffering off`): the workers (which drop to an unprivileged
user when nginx starts as root) need no writable folder.

:func:`nginx_config` writes one self-contained nginx.conf (pid, logs and temp folders under its own
prefix), started as `nginx -c FILE -p PREFIX -g 'daemon off;'` by whoever owns it and stopped by
its PID.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fedpriv.deployment.processes import DeploymentError, ManagedProcess, wait_until_ready

NGINX_INSTALL_HINT = ("install Debian's package: `sudo apt-get install nginx-light` (or `nginx`); "
                      "fedpriv runs it as its own process, so the distribution's service need not be enabled")
DEFAULT_PUBLIC_PORT = 8443
# Above Flower's 5 MiB array chunks (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE) and its 10 MB FAB limit.
DEFAULT_MAX_BODY = "64m"
# Longer than any Fleet call waits (Flower's client timeout is 30 s; pulls are short polls).
UPSTREAM_TIMEOUT_S = 300
# Where Debian puts the binary: not on an unprivileged user's PATH.
_SBIN = (Path("/usr/sbin/nginx"), Path("/usr/local/sbin/nginx"))


def find_nginx() -> str:
    """The nginx binary (PATH, then /usr/sbin); DeploymentError saying how to install it if absent."""
    found = shutil.which("nginx") or next((str(path) for path in _SBIN if path.is_file()), None)
    if not found:
        raise DeploymentError(f"nginx was not found (the reverse proxy in front of the SuperLink); {NGINX_INSTALL_HINT}")
    return found


@dataclass(frozen=True)
class ProxySettings:
    """What the proxy needs: where it listens, where the SuperLink is, and the federation's TLS files."""

    prefix: Path  # nginx's own folder: nginx.conf, nginx.pid, logs/, temp/
    listen: str  # HOST:PORT hospitals connect to (the public port)
    superlink: str  # HOST:PORT of the SuperLink, on loopback
    certificate: Path  # the federation's server certificate (SANs: the names hospitals use)
    key: Path
    client_ca: Path  # the federation's CA: client certificates must be issued by it; also verifies the SuperLink
    superlink_name: str = "localhost"  # the name checked in the SuperLink's certificate
    max_body: str = DEFAULT_MAX_BODY

    @property
    def config_path(self) -> Path:
        return self.prefix / "nginx.conf"


def _quoted(path: Path | str) -> str:
    text = str(path)
    if any(c in text for c in '"\\;{}$\n'):
        raise DeploymentError(f"{text!r}: nginx paths may not contain quotes, backslashes, ';', braces or '$'")
    return f'"{text}"'


def split_address(address: str, what: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT; DeploymentError naming `what` if it is not one."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeploymentError(f"{what}: {address!r} is not HOST:PORT (e.g. 0.0.0.0:{DEFAULT_PUBLIC_PORT})")
    return host, int(port)


def nginx_config(settings: ProxySettings) -> str:
    """A complete nginx.conf: mutual TLS on `listen`, `POST /v1/fleet/` forwarded, everything else 403."""
    split_address(settings.listen, "listen")
    split_address(settings.superlink, "superlink")
    prefix = settings.prefix
    temp = prefix / "temp"
    q = _quoted
    return f"""# Written by fedpriv-deploy (fedpriv.deployment.proxy). Start: nginx -c {settings.config_path} -p {prefix} -g 'daemon off;'
# Hospitals reach only the Fleet API, with a client certificate from the federation's CA.
worker_processes 1;
pid {q(prefix / "nginx.pid")};
lock_file {q(prefix / "nginx.lock")};
error_log stderr warn;  # to whoever started nginx (its log file, or the journal)

events {{
    worker_connections 512;
}}

http {{
    server_tokens off;
    log_format fleet '$remote_addr [$time_local] "$request" $status $body_bytes_sent '
                     'client="$ssl_client_s_dn" verify=$ssl_client_verify';
    access_log {q(prefix / "logs" / "access.log")} fleet;
    client_body_temp_path {q(temp / "body")};
    proxy_temp_path {q(temp / "proxy")};
    fastcgi_temp_path {q(temp / "fastcgi")};
    uwsgi_temp_path {q(temp / "uwsgi")};
    scgi_temp_path {q(temp / "scgi")};

    upstream superlink {{
        server {settings.superlink};
        keepalive 16;
    }}

    server {{
        listen {settings.listen} ssl;
        ssl_certificate {q(settings.certificate)};
        ssl_certificate_key {q(settings.key)};
        ssl_protocols TLSv1.2 TLSv1.3;

        # Mutual TLS: no certificate issued by the federation's CA, no request (nginx answers 400).
        ssl_client_certificate {q(settings.client_ca)};
        ssl_verify_client on;
        ssl_verify_depth 1;

        client_max_body_size {settings.max_body};

        # The Fleet API only, on the normalised path (`..` and %-escapes resolved before matching).
        location /v1/fleet/ {{
            limit_except POST {{
                deny all;
            }}
            proxy_pass https://superlink/v1/fleet/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Client-Certificate-Subject $ssl_client_s_dn;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {q(settings.client_ca)};
            proxy_ssl_name {settings.superlink_name};
            proxy_ssl_server_name on;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_connect_timeout 10s;
            proxy_send_timeout {UPSTREAM_TIMEOUT_S}s;
            proxy_read_timeout {UPSTREAM_TIMEOUT_S}s;
        }}

        # Control (/v1/control/), Runtime (/v1/runtime/), /health and anything else: never forwarded.
        location / {{
            return 403;
        }}
    }}
}}
"""


def write_proxy_config(settings: ProxySettings) -> Path:
    """Write nginx.conf under the prefix (and the folders nginx writes to); its path."""
    for path in (settings.certificate, settings.key, settings.client_ca):
        if not Path(path).is_file():
            raise DeploymentError(f"TLS file not found: {path} (see `fedpriv-deploy credentials`)")
    for folder in ("logs", "temp"):
        (settings.prefix / folder).mkdir(parents=True, exist_ok=True)
    settings.config_path.write_text(nginx_config(settings))
    return settings.config_path


def proxy_command(settings: ProxySettings, nginx: str | None = None) -> list[str]:
    """`nginx -c CONF -p PREFIX -g 'daemon off;'`: in the foreground, stopped by its PID."""
    return [nginx or find_nginx(), "-c", str(settings.config_path), "-p", f"{settings.prefix}/",
            "-g", "daemon off;"]


def check_proxy_config(settings: ProxySettings, nginx: str | None = None) -> None:
    """`nginx -t` on the written config; DeploymentError with nginx's own message if it is refused."""
    command = [*proxy_command(settings, nginx), "-t", "-q"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    if completed.returncode != 0:
        detail = (completed.stderr or completed.stdout).strip()
        raise DeploymentError(f"nginx refused {settings.config_path}: {detail}")


def proxy_ready(address: str, ca_certificate: Path) -> bool:
    """True once the proxy completes a TLS handshake on `address` with the federation's certificate."""
    host, port = split_address(address, "proxy")
    context = ssl.create_default_context(cafile=str(ca_certificate))
    try:
        with socket.create_connection((host, port), timeout=2) as raw, \
                context.wrap_socket(raw, server_hostname=host):
            return True
    except OSError:
        return False


def wait_for_proxy(proxy: ManagedProcess, address: str, ca_certificate: Path, timeout: float = 30.0) -> None:
    """Block until the proxy answers TLS on `address`; DeploymentError if nginx exits or times out."""
    wait_until_ready(proxy, "nginx", lambda: proxy_ready(address, ca_certificate), timeout, f"answer on {address}")
