"""`fedpriv-deploy`: run fedpriv on Flower's deployment engine (SuperLink + hospital SuperNodes).

Subcommands:

* ``credentials``: (coordinator) a CA and the server's TLS certificate;
* ``hospital-keys``: (each hospital, at its own site) its SuperNode key pair, TLS key and a
  certificate signing request; the private keys never leave the hospital;
* ``sign``: (coordinator) sign a hospital's certificate request with the CA;
* ``superlink``: start the coordinator's SuperLink (loopback, TLS, SuperNode authentication on);
* ``proxy``: write the nginx configuration in front of it (mutual TLS, Fleet API only) and start nginx;
* ``node``: start one hospital's SuperNode with its own data, budget, delta and ledger (and, unless
  ``--separate-launcher``, its approved-app launcher: as ``--clientapp-user`` when run as root);
* ``launcher``: (hospital) the approved-app launcher in a unit of its own, as the ClientApp user;
* ``app``: write the Flower app folder (and a run-config template) that `flwr run` uploads;
* ``local``: a one-machine rehearsal: SuperLink, proxy, registered SuperNodes, a real run, clean stop.

`superlink`, `proxy` and `node` print the raw command they run (use ``--print-command`` to print it
without running it), so every step can also be done by hand or in a service unit (docs/deployment.md).
The printed lines set PATH themselves and name executables by absolute path.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from fedpriv import rundir
from fedpriv.deployment import app_user  # its functions are looked up at call time: tests stand in for start_as
from fedpriv.deployment.approval import fedpriv_app_hash, parse_approved
from fedpriv.deployment.credentials import (
    hospital_placement,
    make_authority,
    make_credentials,
    placement,
    sign_request,
    write_hospital_request,
)
from fedpriv.deployment.node import hospital_settings, parse_node_config
from fedpriv.errors import ConfigError, FedprivError
from fedpriv.privacy.chain import KEY_DIR_ENV, key_path_for
from fedpriv.simulation import interrupt_on_signals

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130


def _credentials(args: argparse.Namespace) -> int:
    hosts = [host for host in args.hosts.split(",") if host.strip()]
    try:
        if args.hospitals is None:
            credentials = make_authority(args.out, hosts, days=args.days, overwrite=args.force)
        else:
            print("fedpriv-deploy: warning: --hospitals makes every hospital's private keys here, so this machine "
                  "holds them all; for test setups only (hospitals make their own with `fedpriv-deploy "
                  "hospital-keys`)", file=sys.stderr, flush=True)
            hospitals = [name for name in args.hospitals.split(",") if name.strip()]
            credentials = make_credentials(args.out, hospitals, hosts, days=args.days, overwrite=args.force)
    except FileExistsError as error:
        raise FedprivError(str(error)) from None
    print(placement(credentials))
    return 0


def _hospital_keys(args: argparse.Namespace) -> int:
    try:
        request = write_hospital_request(args.out, args.name, overwrite=args.force)
    except FileExistsError as error:
        raise FedprivError(str(error)) from None
    print(hospital_placement(request))
    return 0


def _sign(args: argparse.Namespace) -> int:
    try:
        certificate = sign_request(args.csr, ca_key=args.ca_key, ca_certificate=args.ca_cert, out=args.out,
                                   days=args.days, expected_name=args.name, overwrite=args.force)
    except FileExistsError as error:
        raise FedprivError(str(error)) from None
    print(f"Signed {args.csr}: client certificate written to {certificate}; send it and "
          f"{Path(args.ca_cert).resolve()} back to the hospital")
    return 0


def _exec(command: list[str], print_only: bool, *, flower: bool = True) -> int:
    """Print `command`; unless `print_only`, replace this process with it (same PID, same signals).

    A Flower command is printed with this environment's PATH set (it starts others by name).
    """
    from fedpriv.deployment.processes import flower_env, printable  # deferred: loads torch

    print(shlex.join(printable(command) if flower else command), flush=True)
    if print_only:
        return 0

    env = flower_env(Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")))
    os.execve(command[0], command, env)
    return EXIT_FAILED  # not reached


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _superlink(args: argparse.Namespace) -> int:
    from fedpriv.deployment.processes import superlink_command  # deferred: loads torch

    for path in (args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile):
        if not Path(path).is_file():
            raise FedprivError(f"TLS file not found: {path} (see `fedpriv-deploy credentials`)")
    if args.host not in LOOPBACK:
        print(f"fedpriv-deploy: warning: --host {args.host} exposes the Control API (`flwr run`, `flwr supernode "
              "register/unregister`), which has no authentication, to the network; keep the SuperLink on "
              "127.0.0.1 and let hospitals in through `fedpriv-deploy proxy`", file=sys.stderr, flush=True)
    command = superlink_command(ca_certificate=Path(args.ssl_ca_certfile).resolve(),
                                certificate=Path(args.ssl_certfile).resolve(), key=Path(args.ssl_keyfile).resolve(),
                                host=args.host, port=args.port,
                                database=Path(args.database).resolve() if args.database else None)
    return _exec(command, args.print_command)


def _proxy(args: argparse.Namespace) -> int:
    from fedpriv.deployment.proxy import (  # deferred: loads torch
        ProxySettings,
        check_proxy_config,
        find_nginx,
        proxy_command,
        write_proxy_config,
    )

    settings = ProxySettings(prefix=Path(args.prefix).expanduser().resolve(), listen=args.listen,
                             superlink=args.superlink, certificate=Path(args.ssl_certfile).expanduser().resolve(),
                             key=Path(args.ssl_keyfile).expanduser().resolve(),
                             client_ca=Path(args.client_ca).expanduser().resolve(), max_body=args.max_body)
    nginx = find_nginx()
    config = write_proxy_config(settings)
    check_proxy_config(settings, nginx)
    print(f"# nginx configuration written to {config} (checked with nginx -t)", flush=True)
    return _exec(proxy_command(settings, nginx), args.print_command, flower=False)


def node_config_from_args(args: argparse.Namespace) -> dict[str, object]:
    """The hospital's node config from the `node` subcommand's flags (paths made absolute)."""
    return {"name": args.name, "data": str(Path(args.data).expanduser().resolve()), "dataset": args.dataset,
            "budget-epsilon": args.budget_epsilon, "delta": args.delta,
            "ledger": str(Path(args.ledger).expanduser().resolve()), "accountant": args.accountant,
            "allow-non-private": args.allow_non_private, "threads": args.threads, "device": args.device,
            **({"val-fraction": args.val_fraction} if args.val_fraction else {}),
            **({"privacy-unit": args.privacy_unit} if args.privacy_unit != "image" else {}),
            **({"max-images-per-patient": args.max_images_per_patient} if args.max_images_per_patient else {}),
            **({"attributes-csv": str(Path(args.attributes_csv).expanduser().resolve())} if args.attributes_csv else {}),
            **({"ledger-key": str(Path(args.ledger_key).expanduser().resolve())} if args.ledger_key else {})}


def _node(args: argparse.Namespace) -> int:
    from fedpriv.deployment.processes import (  # deferred: loads torch
        flower_env,
        hospital_exec_command,
        printable,
        supernode_command,
    )

    node_config = node_config_from_args(args)
    settings = parse_node_config(node_config)  # fail here, with the key named, rather than at the first round
    hospital_settings(settings)  # and here too: device=cuda where this machine has no CUDA device
    for path in (args.root_certificates, args.auth_key, args.tls_certificate, args.tls_key):
        if not Path(path).is_file():
            raise FedprivError(f"credential file not found: {path} (see `fedpriv-deploy credentials`)")
    secret_keys = [Path(args.auth_key).resolve(), Path(args.tls_key).resolve()]
    for key in secret_keys:  # whoever runs the ClientApps, no other user may read the keys
        mode = key.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError("--auth-key" if key == secret_keys[0] else "--tls-key", str(key),
                              f"the private key has mode {mode:04o}: other users can read it",
                              f"chmod 600 {key} (owned by the SuperNode's user)")
    command = supernode_command(superlink=args.superlink, node_config=node_config,
                                root_certificates=Path(args.root_certificates).resolve(),
                                auth_key=secret_keys[0], port=args.port,
                                max_retries=args.max_retries, client_certificate=Path(args.tls_certificate).resolve(),
                                client_key=secret_keys[1])
    approved = sorted(parse_approved(args.approved_apps or fedpriv_app_hash()))
    launcher = hospital_exec_command(approved_apps=approved, port=args.port,
                                     unreadable=secret_keys if args.clientapp_user else ())
    if args.separate_launcher:
        if args.clientapp_user:
            raise ConfigError("--clientapp-user", args.clientapp_user, "is for a launcher this command starts; "
                              "--separate-launcher starts none", "drop one of the two flags")
        print("# the launcher runs in its own unit, as another user: `fedpriv-deploy launcher` (not started here)",
              flush=True)
        return _exec(command, args.print_command)
    if args.print_command:
        who = f"as user {args.clientapp_user}" if args.clientapp_user else "as this same user"
        print(shlex.join(printable(launcher)) + f"  # next to the SuperNode, {who}: runs only the approved apps",
              flush=True)
        return _exec(command, True)
    user, env, home = None, None, None
    if args.clientapp_user:
        user = app_user.lookup_app_user(args.clientapp_user)
        if os.geteuid() != 0:
            raise ConfigError("--clientapp-user", args.clientapp_user, "starting the launcher as another user "
                              f"needs root, and this runs as uid {os.geteuid()}", app_user.SEPARATE_UNIT)
        home = Path(args.clientapp_home or user.home / ".flwr").expanduser().absolute()
        if not home.exists() and home.parent.is_dir():
            home.mkdir(mode=0o700)
            os.chown(home, user.uid, user.gid)
        app_user.check_app_user(user, secret_keys=secret_keys, data=settings.data, ledger=settings.ledger,
                                ledger_key=_ledger_key(args, settings.ledger), home=home,
                                programs=app_user.launcher_programs(launcher))
        # Its own Flower home (ClientApps are installed there) and HOME; the rest of the environment as ours.
        env = {**flower_env(home), "HOME": str(home)}
    elif os.geteuid() == 0:
        raise ConfigError("--clientapp-user", None, "is required when the node runs as root: the ClientApps would "
                          "run as root and could read every file, the SuperNode's private keys included",
                          "pass --clientapp-user NAME (an unprivileged user that cannot read the keys), or run "
                          "the node as its own user and " + app_user.SEPARATE_UNIT)
    else:
        print(f"fedpriv-deploy: warning: ClientApps run as this same OS user (uid {os.geteuid()}), which can read "
              f"the SuperNode's private keys {secret_keys[0]} and {secret_keys[1]}: an approved app's code could "
              f"act as this hospital. For production, {app_user.SEPARATE_UNIT}", file=sys.stderr, flush=True)
    # The launcher follows this PID, which exec() hands on to the SuperNode: one ends, both end.
    app_user.start_as([*launcher, "--parent-pid", str(os.getpid())], user, env=env, cwd=home)
    return _exec(command, False)


def _ledger_key(args: argparse.Namespace, ledger: Path) -> Path:
    """The ledger key the ClientApp will use: --ledger-key, else the default file in $FEDPRIV_KEY_DIR."""
    if args.ledger_key:
        return Path(args.ledger_key).expanduser().resolve()
    if os.environ.get(KEY_DIR_ENV, "").strip():
        return key_path_for(ledger)
    raise ConfigError("--ledger-key", None, "must be named when ClientApps run as another user (by default the "
                      "key would go to that user's config folder)",
                      "pass --ledger-key /srv/hospital/ledger-key/ledger.key, in a folder that user owns")


def _launcher(args: argparse.Namespace) -> int:
    from fedpriv.deployment.processes import hospital_exec_command  # deferred: loads torch

    keys = [Path(path).expanduser().absolute() for path in args.supernode_keys.split(",") if path.strip()]
    if not keys:
        raise ConfigError("--supernode-keys", args.supernode_keys, "must name the SuperNode's private keys",
                          "pass --supernode-keys /srv/hospital/keys/A.key,/srv/hospital/keys/A-tls.key")
    approved = sorted(parse_approved(args.approved_apps or fedpriv_app_hash()))
    # fedpriv-hospital-exec itself refuses to start if it can open one of the keys (--unreadable).
    return _exec(hospital_exec_command(approved_apps=approved, port=args.port, unreadable=keys), args.print_command)


def _app_hash(args: argparse.Namespace) -> int:
    print(fedpriv_app_hash())
    return 0


def _app(args: argparse.Namespace) -> int:
    from fedpriv.app_config import write_app  # deferred: loads torch
    from fedpriv.deployment.processes import write_run_config  # deferred: loads torch

    app = write_app(Path(args.out).resolve())
    run_config = write_run_config(app.parent / "run-config.toml", run_dir=Path(args.run_dir).resolve(),
                                  overrides=shlex.join(args.overrides))
    print(f"Flower app written to {app}; run config template: {run_config}")
    print(f"Launch a run with:\n  flwr run {shlex.quote(str(app))} <connection> --run-config "
          f"{shlex.quote(str(run_config))} --stream")
    return 0


def _local(args: argparse.Namespace) -> int:
    from fedpriv.app_config import compose_config  # deferred: loads torch
    from fedpriv.deployment.rehearsal import CLIENTAPP_USER_NOTE, LocalFederation  # deferred: loads torch
    from fedpriv.experiment import absolute_paths, prepare_experiment  # deferred: loads torch

    overrides = list(args.overrides) + [f"federation.num_hospitals={args.hospitals}",
                                        f"strategy.num_rounds={args.rounds}"]
    if args.mode:
        overrides.append(f"strategy.mode={args.mode}")
    cfg = absolute_paths(compose_config(overrides))
    experiment = prepare_experiment(cfg)  # every config and data check before anything starts
    budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else None
    out = Path(args.out or f"outputs/deploy/{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    print(f"Rehearsal in {out}: {experiment.dataset.describe()}", flush=True)
    with LocalFederation(experiment, out, budgets=budgets) as federation:
        for hospital in federation.hospitals:
            print(f"  hospital {hospital.name}: node {hospital.node_id}, port {hospital.port}, "
                  f"budget {hospital.budget_epsilon:g} (delta {hospital.delta:g}), ledger {hospital.ledger}",
                  flush=True)
        print(f"  SuperLink (TLS, SuperNode authentication) on loopback at {federation.superlink_address}; "
              f"hospitals reach only its Fleet API, through nginx (mutual TLS) at {federation.public_address}",
              flush=True)
        print(f"  REHEARSAL ONLY: {CLIENTAPP_USER_NOTE}", flush=True)
        outcome = federation.run(cfg, timeout=args.timeout)
    print(rundir.read_summary(outcome.run_dir))
    print(f"Server artifacts in {outcome.run_dir}; every process started was stopped.")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpriv-deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is started and stopped")
    commands = parser.add_subparsers(dest="command", required=True)

    creds = commands.add_parser("credentials", help="(coordinator) make the CA and the server certificate")
    creds.add_argument("--hospitals", help="TEST SETUPS ONLY: also make these hospitals' keys here (comma-separated); "
                                          "by default each hospital runs `hospital-keys` itself")
    creds.add_argument("--out", required=True, help="folder to write the credentials into")
    creds.add_argument("--hosts", default="127.0.0.1,localhost",
                       help="comma-separated host names/IPs hospitals use to reach the SuperLink "
                            "(the certificate's SANs; keep 127.0.0.1 for the coordinator's own ServerApp)")
    creds.add_argument("--days", type=int, default=365, help="certificate validity in days")
    creds.add_argument("--force", action="store_true", help="overwrite existing credential files")
    creds.set_defaults(handler=_credentials)

    keys = commands.add_parser("hospital-keys", help="(hospital) make this hospital's keys and certificate request")
    keys.add_argument("--name", required=True, help="the hospital's name (the coordinator registers it by this name)")
    keys.add_argument("--out", required=True, help="folder for NAME.key, NAME.pub, NAME-tls.key, NAME-tls.csr")
    keys.add_argument("--force", action="store_true", help="replace existing keys (they must be registered again)")
    keys.set_defaults(handler=_hospital_keys)

    sign = commands.add_parser("sign", help="(coordinator) sign a hospital's TLS certificate request with the CA")
    sign.add_argument("--csr", required=True, help="the hospital's NAME-tls.csr")
    sign.add_argument("--ca-key", required=True, help="ca/ca.key")
    sign.add_argument("--ca-cert", required=True, help="coordinator/ca.crt")
    sign.add_argument("--out", required=True, help="where to write the certificate (NAME-tls.crt)")
    sign.add_argument("--name", help="refuse unless the request is for this hospital name")
    sign.add_argument("--days", type=int, default=365, help="certificate validity in days")
    sign.add_argument("--force", action="store_true", help="overwrite an existing certificate file")
    sign.set_defaults(handler=_sign)

    link = commands.add_parser("superlink", help="start the SuperLink with TLS and SuperNode authentication")
    link.add_argument("--ssl-ca-certfile", required=True, help="coordinator/ca.crt")
    link.add_argument("--ssl-certfile", required=True, help="coordinator/server.pem")
    link.add_argument("--ssl-keyfile", required=True, help="coordinator/server.key")
    link.add_argument("--host", default="127.0.0.1",
                      help="interface to listen on (default: loopback; hospitals come in through the proxy)")
    link.add_argument("--port", type=int, default=8000, help="the SuperLink's one HTTPS port")
    link.add_argument("--database", help="keep SuperLink state (registered nodes, runs) in this file")
    link.add_argument("--print-command", action="store_true", help="print the flower-superlink command only")
    link.set_defaults(handler=_superlink)

    proxy = commands.add_parser("proxy", help="start nginx in front of the SuperLink: mutual TLS, Fleet API only")
    proxy.add_argument("--ssl-certfile", required=True, help="coordinator/server.pem (SANs: the names hospitals use)")
    proxy.add_argument("--ssl-keyfile", required=True, help="coordinator/server.key")
    proxy.add_argument("--client-ca", required=True,
                       help="coordinator/ca.crt: hospitals' client certificates must be issued by it")
    proxy.add_argument("--listen", default="0.0.0.0:8443", help="the public HOST:PORT hospitals connect to")
    proxy.add_argument("--superlink", default="127.0.0.1:8000", help="the SuperLink's HOST:PORT (loopback)")
    proxy.add_argument("--prefix", required=True, help="nginx's folder: nginx.conf, nginx.pid, logs/, temp/")
    proxy.add_argument("--max-body", default="64m", help="largest request body (Flower sends up to 5 MiB chunks)")
    proxy.add_argument("--print-command", action="store_true", help="write and check the config, print the command only")
    proxy.set_defaults(handler=_proxy)

    node = commands.add_parser("node", help="start a hospital's SuperNode with its own settings")
    node.add_argument("--name", required=True, help="the hospital's own label (its logs and ledger); the server "
                                                   "reports the name the coordinator registered its key under")
    node.add_argument("--data", required=True, help="image folder, MedMNIST npz, or folder holding <dataset>.npz")
    node.add_argument("--dataset", default="pneumoniamnist", help="MedMNIST flag of an npz (default pneumoniamnist)")
    node.add_argument("--budget-epsilon", type=float, required=True, help="the hospital's privacy budget")
    node.add_argument("--delta", type=float, required=True, help="the hospital's delta, e.g. 1e-5")
    node.add_argument("--ledger", required=True, help="the hospital's ledger file (its folder must exist)")
    node.add_argument("--accountant", default="prv", choices=("prv", "rdp"))
    node.add_argument("--allow-non-private", action="store_true", help="accept non-private rounds (epsilon = inf)")
    node.add_argument("--threads", type=int, help="torch CPU threads for training")
    node.add_argument("--device", default="auto", help="where it trains: auto (default: CUDA where this machine "
                                                        "has it, else the CPU), cpu, cuda or cuda:N")
    node.add_argument("--val-fraction", type=float, help="image folders: share of images held out for validation "
                                                         "(default 0: every image trains)")
    node.add_argument("--privacy-unit", default="image", choices=("image", "patient"),
                      help="what epsilon protects: each image (default) or each patient (needs patient ids)")
    node.add_argument("--max-images-per-patient", type=int, help="privacy-unit patient: most images of a "
                                                                 "patient per step (default: all)")
    node.add_argument("--attributes-csv", help="image folders: CSV with path and patient_id columns (patient ids)")
    node.add_argument("--superlink", required=True, help="the coordinator's public HOST:PORT (its proxy)")
    node.add_argument("--root-certificates", required=True, help="the federation's CA certificate (ca.crt)")
    node.add_argument("--auth-key", required=True, help="the hospital's private key (NAME.key)")
    node.add_argument("--tls-certificate", required=True, help="the hospital's TLS client certificate (NAME-tls.crt)")
    node.add_argument("--tls-key", required=True, help="its key (NAME-tls.key)")
    node.add_argument("--port", type=int, default=9094, help="the SuperNode's local API port (distinct per node)")
    node.add_argument("--max-retries", type=int, help="give up after this many failed connection attempts")
    node.add_argument("--approved-apps", help="comma-separated sha256 hashes of the Flower apps this hospital "
                                              "runs (default: fedpriv's own, `fedpriv-deploy app-hash`)")
    node.add_argument("--ledger-key", help="the key that authenticates the ledger (default: in $FEDPRIV_KEY_DIR "
                                           "or the user's config folder); required with --clientapp-user")
    node.add_argument("--clientapp-user", help="(as root) start the launcher, and so every ClientApp, as this OS "
                                               "user, after checking it cannot read the SuperNode's private keys "
                                               "and can read the data and write the ledger and ledger key; "
                                               "required when running as root")
    node.add_argument("--clientapp-home", help="with --clientapp-user: that user's Flower home, where ClientApps "
                                               "are installed (default ~NAME/.flwr)")
    node.add_argument("--separate-launcher", action="store_true",
                      help="start only the SuperNode: the launcher runs in its own unit as another user "
                           "(`fedpriv-deploy launcher`)")
    node.add_argument("--print-command", action="store_true",
                      help="print the fedpriv-hospital-exec and fedpriv-supernode commands only")
    node.set_defaults(handler=_node)

    launch = commands.add_parser("launcher", help="(hospital) start the approved-app launcher, as the ClientApp "
                                                  "user, next to a node started with --separate-launcher")
    launch.add_argument("--port", type=int, default=9094, help="the SuperNode's local API port (its --port)")
    launch.add_argument("--supernode-keys", required=True,
                        help="comma-separated: the SuperNode's private keys (NAME.key,NAME-tls.key); the launcher "
                             "refuses to start if it can read one")
    launch.add_argument("--approved-apps", help="comma-separated sha256 hashes of the apps this hospital runs "
                                                "(default: fedpriv's own)")
    launch.add_argument("--print-command", action="store_true", help="print the fedpriv-hospital-exec command only")
    launch.set_defaults(handler=_launcher)

    digest = commands.add_parser("app-hash", help="print the hash of fedpriv's Flower app (what a hospital approves)")
    digest.set_defaults(handler=_app_hash)

    app = commands.add_parser("app", help="write the Flower app folder that `flwr run` uploads")
    app.add_argument("--out", required=True, help="folder for the app (a pyproject.toml is written there)")
    app.add_argument("--run-dir", required=True, help="where the ServerApp writes artifacts on the coordinator")
    app.add_argument("overrides", nargs="*", help="Hydra overrides for the run, e.g. strategy=sequential")
    app.set_defaults(handler=_app)

    local = commands.add_parser("local", help="rehearse the deployment on this machine (SuperLink, proxy, SuperNodes)")
    local.add_argument("--hospitals", type=int, default=3, help="number of hospitals (SuperNodes)")
    local.add_argument("--rounds", type=int, default=2, help="federated rounds")
    local.add_argument("--mode", choices=("parallel", "sequential"), help="strategy mode (default: the config's)")
    local.add_argument("--out", help="rehearsal folder (default outputs/deploy/<time>)")
    local.add_argument("--budgets", help="comma-separated epsilon per hospital (default: the config's)")
    local.add_argument("--timeout", type=float, help="give up on the run after this many seconds")
    local.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset.root=/data privacy.epsilon=3")
    local.set_defaults(handler=_local)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point (`fedpriv-deploy`)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # Ctrl-C, SIGTERM and SIGHUP raise KeyboardInterrupt, so every `finally` (stopping processes) runs;
    # explicitly, since a shell starting this in the background leaves SIGINT ignored.
    interrupt_on_signals()
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("fedpriv-deploy: interrupted; every process it started was stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except FedprivError as error:
        from fedpriv.deployment.processes import DeploymentError  # deferred: loads torch

        print(f"fedpriv-deploy: error: {error}", file=sys.stderr)
        return EXIT_FAILED if isinstance(error, DeploymentError) else EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
