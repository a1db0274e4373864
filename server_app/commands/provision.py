"""`koala provision ...`: register devices, write the hardened broker's files, build flash bundles.

    koala provision add DEV --arch cnn_small            register (only a $7$ hash is stored)
    koala provision broker-files --out DIR              passwd + acl + certs + mosquitto.conf
    koala provision revoke DEV --broker-dir DIR         device can no longer connect
    koala provision rotate DEV --secret-file F          new secret, old one stops working
    koala provision bundle DEV --out DIR --broker-url mqtts://host:8883 --broker-dir DIR
    koala provision fleet MANIFEST.yml [--out DIR] [--rotate]   all of the above for a whole fleet

Commands that change who may connect regenerate the broker files when `--broker-dir` is given
(the broker loads them at its next start) and, when `--pid-file` or `--control-url` says a broker
is running, push the change to it at once over the dynamic-security `$CONTROL` topic as
`koala-admin`: revoke deletes the account and Mosquitto disconnects its live sessions; add/rotate
(re)creates it with the new secret. Secrets are written only to 0600 files or bundles, never
printed or logged. Bad input (unsafe device id, unknown architecture or device) is one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

HELP = "provision devices: credentials, broker password/ACL/TLS files, flashable bundles"

# Same database as the server's Settings (database.url) unless --db says otherwise.
DEFAULT_DB = (
    os.environ.get("KOALA_DATABASE__URL") or os.environ.get("KOALA_DATABASE_URL") or "sqlite:///./koala.db"
)


def _broker_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--broker-dir", type=Path, required=required, help="broker files directory to refresh")
    p.add_argument(
        "--pid-file", type=Path, help="a broker is running from --broker-dir: apply the change to it live"
    )
    p.add_argument(
        "--control-url",
        help="apply the change live through this listener (default with --pid-file: the loopback listener "
        "in DIR/mosquitto.conf), e.g. mqtt://127.0.0.1:1883",
    )


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--db", default=DEFAULT_DB, help="registry database URL (env KOALA_DATABASE__URL, as the server)"
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    a = sub.add_parser("add", help="register a device and issue its broker credentials")
    a.add_argument("device_id")
    a.add_argument("--arch", required=True, help="small-model architecture, e.g. cnn_small")
    a.add_argument(
        "--secret-file", type=Path, help="write the clear secret here (0600); else `bundle` issues one"
    )
    _broker_args(a)

    b = sub.add_parser("broker-files", help="write passwd, acl, certs and mosquitto.conf from the registry")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument(
        "--profile",
        choices=("local", "docker"),
        default="local",
        help="local: paths as on this host; docker: paths inside the eclipse-mosquitto container",
    )
    b.add_argument(
        "--tls-host", action="append", default=[], help="extra DNS name / IP for the server certificate"
    )
    b.add_argument("--tls-port", type=int, default=8883)
    b.add_argument("--tls-bind", default="0.0.0.0")
    b.add_argument(
        "--plain-port", type=int, default=1883, help="loopback plain listener for the server; 0 = none"
    )
    b.add_argument("--max-connections", type=int, default=1024)
    b.add_argument("--pid-file", type=Path)

    r = sub.add_parser("revoke", help="revoke a device: it can no longer connect")
    r.add_argument("device_id")
    _broker_args(r)

    o = sub.add_parser("rotate", help="issue a new secret; the old one stops working")
    o.add_argument("device_id")
    o.add_argument("--secret-file", type=Path, required=True)
    _broker_args(o)

    n = sub.add_parser("bundle", help="build a flashable bundle (issues a new secret)")
    n.add_argument("device_id")
    n.add_argument("--out", type=Path, required=True)
    n.add_argument("--broker-url", required=True, help="what the device dials, e.g. mqtts://broker.lan:8883")
    n.add_argument(
        "--broker-dir", type=Path, required=True, help="broker files dir (its CA signs the broker)"
    )
    n.add_argument("--pid-file", type=Path)
    n.add_argument("--data", type=Path, help="ship this private-data .npz (demos)")
    n.add_argument("--data-path", default="", help="private-data .npz path on the device (default /var/lib/koala/data.npz under its root)")
    n.add_argument("--proxy", type=Path, help="ship the proxy-inputs .npz")
    n.add_argument("--proxy-sha256", default="", help="or only its digest ...")
    n.add_argument("--proxy-url", default="", help="... and where the device fetches it")
    n.add_argument("--client-cert", action="store_true", help="also issue a TLS client certificate")
    n.add_argument("--wheelhouse", type=Path, help="reuse a wheel dir built by an earlier bundle")
    n.add_argument("--platform", help="wheels for another target, e.g. manylinux_2_36_aarch64")
    n.add_argument("--python-version", help="target Python, e.g. 3.11")

    f = sub.add_parser(
        "fleet", help="provision every device of a fleet manifest: credentials, broker files, bundles"
    )
    f.add_argument("manifest", type=Path, help="fleet YAML (see deploy/fleet.example.yml)")
    f.add_argument(
        "--out",
        type=Path,
        default=Path("koala-fleet"),
        help="workspace for relative broker.dir / bundles.out (default ./koala-fleet)",
    )
    f.add_argument(
        "--rotate",
        action="store_true",
        help="also issue new secrets + bundles for devices already provisioned (default: skip them)",
    )


def _refresh(args: argparse.Namespace, secret: str | None = None) -> None:
    """Regenerate the broker files, then apply the change to the running broker if there is one."""
    from server_app.provisioning.broker_files import cut_off, write_broker_files
    from server_app.provisioning.dynsec import BrokerControl, ControlEndpoint
    from server_app.provisioning.registry_link import active_credentials

    broker_dir: Path | None = args.broker_dir
    if broker_dir is None:
        return
    files = write_broker_files(broker_dir, active_credentials(args.db))
    print(f"[provision] broker files refreshed in {files.dir}")
    control_url = getattr(args, "control_url", None)
    if args.pid_file is None and control_url is None:
        return
    endpoint = ControlEndpoint.from_url(control_url) if control_url else None
    control = BrokerControl.for_broker_dir(broker_dir, endpoint)
    if args.action == "revoke":
        cut_off(control, None, args.device_id, [])
        print(f"[provision] {args.device_id} deleted on the live broker (its sessions are disconnected)")
    elif secret is not None:
        control.upsert_device(args.device_id, secret)
        print(f"[provision] {args.device_id} has its new credentials on the live broker")


def _broker_files(args: argparse.Namespace) -> int:
    from server_app.provisioning.broker_conf import BrokerConf, local_user
    from server_app.provisioning.broker_files import reload_broker, write_broker_files
    from server_app.provisioning.dynsec import DOCKER_PLUGIN
    from server_app.provisioning.registry_link import active_credentials

    out = args.out.resolve()
    plain = args.plain_port or None
    hosts = list(args.tls_host)
    if args.profile == "docker":
        # The server reaches the broker over the compose network by service name, through TLS.
        conf = BrokerConf(
            Path("/mosquitto/config"),
            Path("/mosquitto/data"),
            tls_port=args.tls_port,
            tls_bind="0.0.0.0",
            server_port=None,
            run_as_user="mosquitto",
            max_connections=args.max_connections,
            dynsec_plugin=DOCKER_PLUGIN,
        )
        hosts.append("mosquitto")
    else:
        (out / "data").mkdir(parents=True, exist_ok=True)
        conf = BrokerConf(
            out,
            out / "data",
            tls_port=args.tls_port,
            tls_bind=args.tls_bind,
            server_port=plain,
            run_as_user=local_user(),
            max_connections=args.max_connections,
        )
    files = write_broker_files(out, active_credentials(args.db), conf, hosts)
    print(f"[provision] {files.conf} ({'changed' if files.changed else 'unchanged'})")
    if args.pid_file is not None and files.changed:
        print(f"[provision] reloaded mosquitto pid {reload_broker(args.pid_file)}")
    return 0


def _bundle(args: argparse.Namespace) -> int:
    from server_app.provisioning import tls
    from server_app.provisioning.broker_files import ensure_pki
    from server_app.provisioning.bundle import BundleSpec, build_bundle
    from server_app.provisioning.passwords import mosquitto_hash, new_secret
    from server_app.provisioning.registry_link import get_device, set_credentials
    from server_app.provisioning.wheels import Target

    dev = get_device(args.db, args.device_id)
    if dev.revoked:
        print(f"[provision] {args.device_id} is revoked; `koala provision add` it again first")
        return 1
    ca_crt = ensure_pki(args.broker_dir)
    client = None
    if args.client_cert:
        client = tls.make_client_cert(tls.load_pair(ca_crt, ca_crt.with_name("ca.key")), args.device_id)
    secret = new_secret()
    spec = BundleSpec(
        device_id=args.device_id,
        arch=dev.arch or "cnn_small",
        secret=secret,
        broker_url=args.broker_url,
        ca_cert_pem=ca_crt.read_bytes(),
        data=args.data,
        data_path=getattr(args, "data_path", ""),
        proxy=args.proxy,
        proxy_sha256=args.proxy_sha256,
        proxy_url=args.proxy_url,
        client_cert=client,
        wheelhouse=args.wheelhouse,
        target=Target(args.platform, args.python_version),
    )
    tarball = build_bundle(spec, args.out)
    pw_hash = mosquitto_hash(secret)
    set_credentials(args.db, args.device_id, pw_hash)  # only after the bundle exists
    on_secret = getattr(args, "on_secret", None)  # `fleet` with a NATS cluster: keep its bcrypt too
    if on_secret is not None:
        on_secret(args.device_id, secret, pw_hash)
    _refresh(args, secret)
    print(f"[provision] bundle {tarball} (dir {tarball.parent / ('koala-bundle-' + args.device_id)})")
    return 0


def known_archs() -> tuple[str, ...]:
    from server_app.zoo.archs import ARCHS

    return tuple(sorted(ARCHS))


def run(args: argparse.Namespace) -> int:
    """Operator mistakes are one line on stderr and exit code 2, never a traceback."""
    from server_app.provisioning.dynsec import ControlError
    from server_app.provisioning.identity import InvalidDeviceId
    from server_app.provisioning.registry_link import UnknownDevice

    try:
        return _run(args)
    except (InvalidDeviceId, UnknownDevice, ValueError) as exc:
        print(f"koala provision {args.action}: {exc}", file=sys.stderr)
        return 2
    except (ControlError, OSError) as exc:
        print(f"koala provision {args.action}: broker not updated live: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from server_app.provisioning.identity import check_device_id
    from server_app.provisioning.passwords import mosquitto_hash, new_secret, write_secret_file
    from server_app.provisioning.registry_link import register_device, revoke_device, set_credentials

    if args.action == "broker-files":
        return _broker_files(args)
    if args.action == "fleet":
        return _fleet(args)
    check_device_id(args.device_id)
    if args.action == "add" and args.arch not in known_archs():
        raise ValueError(f"unknown architecture {args.arch!r}; known: {', '.join(known_archs())}")
    if args.action == "bundle":
        return _bundle(args)
    secret = None
    if args.action in ("add", "rotate"):
        secret = new_secret()
        if args.action == "add":
            register_device(args.db, args.device_id, args.arch, mosquitto_hash(secret))
        else:
            set_credentials(args.db, args.device_id, mosquitto_hash(secret))
        if args.secret_file is not None:
            write_secret_file(args.secret_file, secret)
        print(
            f"[provision] {args.action}: {args.device_id} has new credentials"
            + (f" (secret in {args.secret_file})" if args.secret_file else "")
        )
    elif args.action == "revoke":
        revoke_device(args.db, args.device_id)
        print(f"[provision] revoked {args.device_id}")
    _refresh(args, secret)
    return 0


def _fleet(args: argparse.Namespace) -> int:
    """`add` + `broker-files` + `bundle` for every device of a manifest, through the same functions.

    Idempotent: a device that is registered, active, has credentials and a bundle under the bundle
    directory is skipped (its secret is not rotated) unless --rotate; a revoked device is never
    re-admitted here (`koala provision add` does that deliberately). A registered device with no
    bundle here (provisioned by hand) is also skipped: a new bundle would rotate its secret.
    """
    from server_app.provisioning.manifest import load_manifest
    from server_app.provisioning.passwords import mosquitto_hash, new_secret
    from server_app.provisioning.registry_link import UnknownDevice, get_device, register_device

    m = load_manifest(args.manifest)
    db = m.database.url if m.database is not None else args.db
    work = args.out
    broker_dir = work / m.broker.dir
    out = work / m.bundles.out
    b = m.bundles

    todo, rows = [], []
    for d in m.devices:
        try:
            rec = get_device(db, d.id)
        except UnknownDevice:
            rec = None
        tarball = out / f"koala-bundle-{d.id}.tar.gz"
        if rec is None:
            register_device(db, d.id, d.arch, mosquitto_hash(new_secret()))  # as `add`; bundle issues the real one
            print(f"[provision] add: {d.id} registered ({d.arch})")
            todo.append(d)
        elif rec.revoked:
            rows.append((d.id, d.arch, "skipped: revoked (re-admit with `koala provision add`)"))
        elif args.rotate:
            todo.append(d)
        elif rec.has_credentials and tarball.exists():
            rows.append((d.id, rec.arch or d.arch, f"{tarball} (unchanged)"))
        else:
            rows.append((d.id, rec.arch or d.arch, "skipped: registered, no bundle here (--rotate issues one)"))
        if rec is not None and rec.arch and rec.arch != d.arch:
            print(f"[provision] warning: {d.id} is registered as {rec.arch}, manifest says {d.arch}")

    common = {"db": db, "pid_file": None}
    _broker_files(
        argparse.Namespace(
            **common,
            action="broker-files",
            out=broker_dir,
            profile=m.broker.profile,
            tls_host=list(m.broker.tls_hosts),
            tls_port=m.broker.tls_port,
            tls_bind=m.broker.tls_bind,
            plain_port=m.broker.plain_port,
            max_connections=m.broker.max_connections,
        )
    )
    from server_app.provisioning.server_settings import write_server_settings

    settings = write_server_settings(m, work, db)
    wheelhouse = b.wheelhouse
    for d in todo:
        ns = argparse.Namespace(
            **common,
            action="bundle",
            device_id=d.id,
            out=out,
            broker_url=m.broker.url,
            broker_dir=broker_dir.resolve(),
            control_url=None,
            data=d.ship_data,
            data_path=d.data or "",
            proxy=b.proxy,
            proxy_sha256=b.proxy_sha256,
            proxy_url=b.proxy_url,
            client_cert=b.client_cert,
            wheelhouse=wheelhouse,
            platform=b.platform,
            python_version=b.python_version,
            on_secret=_nats_secret_keeper(broker_dir) if m.broker.kind == "nats" else None,
        )
        if _bundle(ns) != 0:
            return 1
        # Wheels are the same for every device: build them once, copy them for the others.
        wheelhouse = wheelhouse or out / f"koala-bundle-{d.id}" / "opt" / "koala" / "wheels"
        rows.append((d.id, d.arch, str(out / f"koala-bundle-{d.id}.tar.gz")))

    if m.broker.kind == "nats":
        _nats_files(m, broker_dir, db)

    order = {d.id: i for i, d in enumerate(m.devices)}
    rows.sort(key=lambda r: order[r[0]])
    w_id = max(len("device"), *(len(r[0]) for r in rows))
    w_arch = max(len("arch"), *(len(r[1]) for r in rows))
    print(f"[provision] fleet {m.name}: {len(todo)} bundled, {len(rows) - len(todo)} unchanged/skipped")
    print(f"{'device':<{w_id}}  {'arch':<{w_arch}}  bundle")
    for dev, arch, where in rows:
        print(f"{dev:<{w_id}}  {arch:<{w_arch}}  {where}")
    print(f"[provision] server settings: {settings} (koala serve --config {settings})")
    return 0


def _nats_secret_keeper(broker_dir: Path) -> Any:
    from server_app.provisioning.nats_cluster import remember_secret

    return lambda device_id, secret, pw_hash: remember_secret(broker_dir, device_id, secret, pw_hash)


def _nats_files(m: Any, broker_dir: Path, db: str) -> None:
    """`broker: {kind: nats}`: nats-<i>.conf per node (after the bundles: their secrets' bcrypt)."""
    from server_app.provisioning.nats_cluster import NatsClusterConf, device_urls, write_nats_files
    from server_app.provisioning.registry_link import active_credentials

    b = m.broker
    out = broker_dir.resolve()
    conf = NatsClusterConf.plan(b.nodes, out, out / "data", hosts=b.cluster_hosts, mqtt_port=b.tls_port,
                                cluster_port=b.cluster_port, client_port=b.client_port, monitor_port=b.monitor_port,
                                bind=b.tls_bind, max_connections=b.max_connections)  # fmt: skip
    creds = [(c.device_id, c.pw_hash) for c in active_credentials(db)]
    files = write_nats_files(out, creds, conf, b.tls_hosts)
    print(f"[provision] NATS cluster: {', '.join(str(p) for p in files.confs)} "
          f"({'changed' if files.changed else 'unchanged'}); nodes: {' '.join(device_urls(conf))}")  # fmt: skip
    if files.left_out:
        print(f"[provision] warning: not in the NATS cluster (no bcrypt of their current secret; "
              f"--rotate issues one): {', '.join(files.left_out)}")  # fmt: skip
