"""``kas-ray`` command line: tokens, encrypt, decrypt, inspect, demo.

Exit codes: 0 ok; 2 bad input or usage; 3 access denied; 4 tampered; 5 KAS unreachable;
6 invalid token; 1 anything else. Failures print one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from kas_ray.config import (
    DEFAULT_BASE_URL,
    DEFAULT_HOST,
    DEFAULT_NATIONS,
    DEFAULT_PORT,
    AbacConfig,
    default_state_dir,
    load_yaml,
)
from kas_ray.errors import (
    AccessDenied,
    ConfigError,
    FormatError,
    KasRayError,
    KasUnreachableError,
    TamperError,
    TokenError,
)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DENIED, EXIT_TAMPERED, EXIT_UNREACHABLE, EXIT_TOKEN = 0, 1, 2, 3, 4, 5, 6
PROFILE_ENV = "KAS_RAY_PROFILE"
TOKEN_ENV = "KAS_RAY_TOKEN"  # noqa: S105 - a variable name, not a secret
ALLOWED_KAS_ENV = "KAS_RAY_ALLOWED_KAS"


def _one_line(text: object) -> str:
    """A message as one line (pydantic and YAML errors span several)."""
    return " ".join(str(text).split())


class _Parser(argparse.ArgumentParser):
    """Usage errors as one stderr line, like every other failure (subparsers inherit the class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {_one_line(message)} (see --help)\n")


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def _exit_code(exc: KasRayError) -> int:
    for kind, code in ((AccessDenied, EXIT_DENIED), (TamperError, EXIT_TAMPERED),
                       (KasUnreachableError, EXIT_UNREACHABLE), (TokenError, EXIT_TOKEN),
                       (FormatError, EXIT_USAGE), (ConfigError, EXIT_USAGE)):
        if isinstance(exc, kind):
            return code
    return EXIT_ERROR


def _abac(args: argparse.Namespace) -> AbacConfig:
    return load_yaml(args.abac_config, AbacConfig) if getattr(args, "abac_config", None) else AbacConfig()


# --- token ------------------------------------------------------------------------------------------
def cmd_token(args: argparse.Namespace) -> int:
    from kas_ray.trust import DevIdentityProvider

    if args.profile != "dev":
        raise CliError("dev tokens can only be minted under the dev profile", EXIT_USAGE)
    idp = DevIdentityProvider(args.state_dir, args.nation)
    print(idp.mint(args.sub, args.clearance, coi=args.coi, ttl=args.ttl, nationality=args.nationality))
    return EXIT_OK


# --- encrypt ----------------------------------------------------------------------------------------
def _kas_keys(args: argparse.Namespace) -> list:
    from kas_ray.client import HttpTransport, KasClient
    from kas_ray.ztdf import KasKey

    if args.kas_key and len(args.kas_key) != len(args.kas):
        raise CliError("give one --kas-key per --kas (in the same order), or none to fetch them")
    keys = []
    for index, url in enumerate(args.kas):
        if args.kas_key:
            keys.append(_key_from_file(url, Path(args.kas_key[index]), args.oaep_hash))
        else:
            client = KasClient(HttpTransport(timeout=args.timeout), use_dpop=False)
            keys.append(client.public_key(url, args.key_algorithm))
    for key in keys:
        assert isinstance(key, KasKey)
    return keys


def _key_from_file(url: str, path: Path, oaep_hash: str | None) -> object:
    from kas_ray.hazmat import primitives as P
    from kas_ray.ztdf import KasKey

    try:
        text = path.read_text()
    except OSError as exc:
        raise CliError(f"cannot read KAS key {path}: {exc.strerror}") from None
    kid = None
    if text.lstrip().startswith("{"):  # {publicKey, kid} as served by /v2/kas_public_key
        try:
            data = json.loads(text)
            text, kid = data["publicKey"], data.get("kid")
        except (ValueError, KeyError, TypeError):
            raise CliError(f"{path} is neither a PEM nor a {{publicKey, kid}} JSON document") from None
    try:
        key = KasKey(url=url, public_key_pem=text, kid=kid or None)
        oaep = oaep_hash or P.oaep_hash_for(key.algorithm)
        return key.model_copy(update={"oaep_hash": oaep})
    except ValueError as exc:
        errors = getattr(exc, "errors", None)  # pydantic ValidationError: keep the first message only
        detail = errors()[0]["msg"].removeprefix("Value error, ") if callable(errors) else str(exc)
        raise CliError(f"{path}: {detail}") from None


def cmd_encrypt(args: argparse.Namespace) -> int:
    from kas_ray.policy import attribute_fqn
    from kas_ray.ztdf import Policy, encrypt
    from kas_ray.ztdf.tdf import MAX_SEGMENT_SIZE

    if not 0 < args.segment_size <= MAX_SEGMENT_SIZE:
        raise CliError(f"--segment-size must be in 1..{MAX_SEGMENT_SIZE}")
    config = _abac(args)
    try:
        attributes = [attribute_fqn(config, "classification", args.classification)]
        attributes += [attribute_fqn(config, "releasable-to", n) for n in args.releasable_to]
        attributes += [attribute_fqn(config, "coi", c) for c in args.coi]
        if args.embargo:
            attributes.append(attribute_fqn(config, config.embargo_attribute, args.embargo))
    except KasRayError as exc:
        raise CliError(f"bad label: {exc.message}") from None
    keys = _kas_keys(args)
    splits = [[k] for k in keys] if args.all_of else [keys]
    policy = Policy.create(attributes)
    _write_atomically(args.output, lambda out: _encrypt_from(args.input, out, encrypt, splits, policy, args))
    print(f"encrypted {args.input} -> {args.output} (policy {policy.uuid}, "
          f"{'allOf' if args.all_of else 'anyOf'} over {len(keys)} KAS)", file=sys.stderr)
    return EXIT_OK


def _encrypt_from(src: str, out, encrypt, splits, policy, args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    with _open_input(src) as fh:
        encrypt(fh, out, splits=splits, policy=policy, segment_size=args.segment_size)


def _open_input(path: str):  # type: ignore[no-untyped-def]
    if path == "-":
        return open(sys.stdin.fileno(), "rb", closefd=False)
    try:
        return open(path, "rb")
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None


def _write_atomically(path: str, write) -> None:  # type: ignore[no-untyped-def]
    """Write to a new ``path.<random>.partial`` and rename on success: a failed run leaves no half file.

    The file is created 0600 with O_EXCL (``mkstemp``): a decrypted document is nobody else's to read,
    and a link planted at a predictable name is never written through.
    """
    if path == "-":
        write(open(sys.stdout.fileno(), "wb", closefd=False))
        return
    target = Path(path)
    try:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f"{target.name}.", suffix=".partial")
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror}") from None
    partial = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
        os.replace(partial, target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise CliError(f"cannot write {path}: {exc.strerror}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


# --- decrypt ----------------------------------------------------------------------------------------
def _token(args: argparse.Namespace) -> str:
    if args.token_file:
        try:
            return Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise CliError(f"cannot read {args.token_file}: {exc.strerror}") from None
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        raise CliError(f"give --token, --token-file or ${TOKEN_ENV}")
    return token.strip()


def _allowed_kas(args: argparse.Namespace) -> list[str]:
    """The KAS the token may go to: --allow-kas, else $KAS_RAY_ALLOWED_KAS, else `kas-ray serve`'s defaults."""
    urls = list(args.allow_kas or []) or os.environ.get(ALLOWED_KAS_ENV, "").replace(",", " ").split()
    return urls or [f"{DEFAULT_BASE_URL}/{nation.lower()}" for nation in DEFAULT_NATIONS]


def cmd_decrypt(args: argparse.Namespace) -> int:
    from kas_ray.client import HttpTransport, KasClient
    from kas_ray.ztdf import decrypt

    client = KasClient(HttpTransport(timeout=args.timeout), _token(args), allowed_kas=_allowed_kas(args))

    def run(out) -> None:  # type: ignore[no-untyped-def]
        with _open_input(args.input) as fh:
            decrypt(fh, out, client)

    _write_atomically(args.output, run)
    return EXIT_OK


# --- inspect ----------------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    from kas_ray.ztdf import Policy, read_manifest

    with _open_input(args.input) as fh:
        manifest = read_manifest(fh)
    info = manifest.encryption_information
    policy = Policy.from_base64(info.policy)
    summary = {
        "schemaVersion": manifest.schema_version,
        "policy": json.loads(policy.to_json()),
        "keyAccess": [{"url": k.url, "type": k.type, "kid": k.kid, "sid": k.sid} for k in info.key_access],
        "splits": len(manifest.key_access_by_split()),
        "segments": len(info.integrity_information.segments),
        "structure": "ok",
    }
    print(json.dumps({"summary": summary, "manifest": manifest.to_wire()} if args.full else summary, indent=2))
    return EXIT_OK


# --- demo -------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from kas_ray.demo import run_demo

    return run_demo(args.state_dir, nations=args.nation or DEFAULT_NATIONS, in_process=args.in_process,
                    port=args.port)


# --- serve ------------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from kas_ray.serve.runner import load_nation_overrides, serve_forever

    return serve_forever(args.state_dir, host=args.host, port=args.port, nations=args.nation or DEFAULT_NATIONS,
                         profile=args.profile, per_nation=load_nation_overrides(args.nation_config))


# --- keys -------------------------------------------------------------------------------------------
_KEY_ALGORITHMS = {"rsa:2048": "rsa:2048", "rsa:3072": "rsa:3072", "rsa:4096": "rsa:4096", "ec": "ec:secp256r1",
                   "ec:secp256r1": "ec:secp256r1"}


def _key_backend(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from kas_ray.config import KeyBackendConfig

    return load_yaml(args.backend_config, KeyBackendConfig) if args.backend_config else KeyBackendConfig()


def _software_keystore(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from kas_ray.keys.software import SoftwareKeystore

    if not (Path(args.state_dir) / "keys" / args.nation.lower() / "index.json").exists():
        raise CliError(f"no software keystore for {args.nation.upper()} under {args.state_dir} "
                       "(a nation's keys are created when its KAS first starts)")
    return SoftwareKeystore(args.state_dir, args.nation, profile=args.profile)


def cmd_keys_list(args: argparse.Namespace) -> int:
    backend = _key_backend(args)
    nation = args.nation.upper()
    if backend.kind == "gcp-kms":
        from kas_ray.keys.gcp_kms import GcpKmsAdmin

        assert backend.gcp is not None
        admin = GcpKmsAdmin(backend.gcp, nation)
        try:
            rows = [{"kid": r.kid, "state": r.state, "algorithm": r.algorithm,
                     "created": r.created.isoformat() if r.created else None, "version": r.name}
                    for r in admin.versions()]
        finally:
            admin.close()
    elif backend.kind == "software":
        import asyncio

        rows = [{"kid": i.kid, "state": i.status, "algorithm": i.algorithm, "oaep_hash": i.oaep_hash,
                 "created": i.created.isoformat() if i.created else None, "version": i.version}
                for i in asyncio.run(_software_keystore(args).keys())]
    else:
        raise CliError(f"kas-ray keys does not manage {backend.kind} keys (use the HSM's own tools)")
    if args.json:
        print(json.dumps({"nation": nation, "backend": backend.kind, "keys": rows}, indent=2))
        return EXIT_OK
    print(f"{nation} keys ({backend.kind}):")
    for row in rows:
        extra = f" oaep-{row['oaep_hash']}" if row.get("oaep_hash") else ""
        print(f"  {row['kid']:<32} {row['state']:<20} {row['algorithm']}{extra}  created {row['created'] or '-'}"
              + (f"  {row['version']}" if backend.kind == "gcp-kms" else ""))
    return EXIT_OK


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    backend = _key_backend(args)
    nation = args.nation.upper()
    algorithm = _KEY_ALGORITHMS[args.algorithm]
    if backend.kind == "gcp-kms":
        from kas_ray.keys.gcp_kms import GcpKmsAdmin

        assert backend.gcp is not None
        if algorithm.startswith("ec:"):
            raise CliError("Cloud KMS keys of kas-ray are RSA decrypt keys: rotate rsa:2048, rsa:3072 or rsa:4096")
        admin = GcpKmsAdmin(backend.gcp, nation)
        try:
            print(f"creating a Cloud KMS key version for {algorithm} (waiting out PENDING_GENERATION, "
                  f"up to {args.wait:.0f}s)...", file=sys.stderr)
            info = admin.rotate(algorithm, wait_seconds=args.wait)
        finally:
            admin.close()
        print(info.kid)
        print(f"  version {info.version}: ENABLED; older versions stay ENABLED and keep decrypting", file=sys.stderr)
        ttl = backend.gcp.key_list_ttl_seconds
        _publish(args, nation, relist_after=ttl,
                 note=f"the HSM actor lists versions again within {ttl:.0f}s")
    elif backend.kind == "software":
        oaep = args.oaep_hash if algorithm.startswith("rsa:") else None
        info = _software_keystore(args).add_key(algorithm, oaep)  # type: ignore[arg-type]
        print(info.kid)
        print(f"  {algorithm} key {info.kid} is now active; the previous one is retired and keeps decrypting",
              file=sys.stderr)
        print("  note: a running HSM actor only sees new software keys after it restarts "
              "(redeploy the nation or restart kas-ray serve)", file=sys.stderr)
        _publish(args, nation, relist_after=0.0, note="")
    else:
        raise CliError(f"kas-ray keys does not manage {backend.kind} keys (use the HSM's own tools)")
    return EXIT_OK


def _publish(args: argparse.Namespace, nation: str, *, relist_after: float, note: str) -> None:
    """Drop the nation's cached public keys in its cache actor, when a Ray cluster is reachable.

    For KMS the HSM actor keeps its own version list for ``relist_after`` seconds: the entry is dropped
    again after that, so no replica re-caches the list from before the rotation.
    """
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        print("  no Ray cluster given (--address or RAY_ADDRESS): KAS caches pick the new key up as they "
              "expire (replicas 30 s, the nation's cache actor up to 1 h)" + (f"; {note}" if note else ""),
              file=sys.stderr)
        return
    dropped = _invalidate_public_keys(address, nation)
    if dropped is None:
        return
    print(f"  invalidated {nation}'s cached public keys in its cache actor; replicas refresh within 30 s",
          file=sys.stderr)
    if relist_after > 0 and not args.no_wait:
        import time

        print(f"  {note}: invalidating again in {relist_after:.0f}s (--no-wait skips)", file=sys.stderr)
        time.sleep(relist_after + 0.5)
        _invalidate_public_keys(address, nation)


def _invalidate_public_keys(address: str, nation: str) -> int | None:
    """``invalidate_prefix`` on the nation's cache actor; None (with a note) if it cannot be reached."""
    try:
        import ray

        from kas_ray.serve.actors import NAMESPACE, cache_actor_name, public_keys_cache_key

        if not ray.is_initialized():
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR")
        actor = ray.get_actor(cache_actor_name(nation), namespace=NAMESPACE)
        return int(ray.get(actor.invalidate_prefix.remote(public_keys_cache_key(nation)), timeout=10))
    except Exception as exc:  # noqa: BLE001 - the rotation itself succeeded; say why caches were not told
        print(f"  could not reach {nation}'s cache actor ({_one_line(exc)[:200]}): KAS caches pick the new key "
              "up as they expire (replicas 30 s, the cache actor up to 1 h)", file=sys.stderr)
        return None


# --- audit ------------------------------------------------------------------------------------------
def _audit_files(args: argparse.Namespace) -> list[Path]:
    from kas_ray.audit import rotated_files

    files = [Path(f) for f in args.files]
    if args.with_rotated:
        if len(files) != 1:
            raise CliError("--with-rotated takes one live audit file")
        files = [*rotated_files(files[0]), files[0]]
    for path in files:
        if not path.is_file():
            raise CliError(f"{path}: no such audit file")
    return files


def _anchor(text: str) -> tuple[int, str]:
    seq, _, digest = text.partition(":")
    if not seq.isdigit() or len(digest) != 64:
        raise argparse.ArgumentTypeError(f"anchor {text!r} is not SEQ:SHA256 (e.g. 41:{'ab' * 32})")
    return int(seq), digest.lower()


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from kas_ray.audit import verify_chain

    files = _audit_files(args)
    report = verify_chain(files, anchors=args.anchor or [])
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    if report.error is not None:
        bad = report.error
        print(f"kas-ray: audit chain broken at {bad}", file=sys.stderr)
        if bad.line:
            print(f"  line {bad.line_no}: {bad.line.decode('utf-8', 'replace').rstrip()[:400]}", file=sys.stderr)
        return EXIT_TAMPERED
    span = f"seq {report.first_seq}..{report.last_seq}" if report.records else "no record"
    print(f"ok: {report.records} records in {len(files)} file(s), {span}")
    if report.head:
        print(f"head: {report.last_seq}:{report.head}  (keep it elsewhere; pass it back with --anchor)")
    return EXIT_OK


def cmd_audit_rotate(args: argparse.Namespace) -> int:
    from kas_ray.audit import JsonLinesAuditSink

    if not Path(args.file).is_file():
        raise CliError(f"{args.file}: no such audit file")
    sink = JsonLinesAuditSink(args.file)
    try:
        rotated = sink.rotate(args.reason)
    finally:
        sink.close()
    if rotated is None:
        print(f"{args.file} has no record yet: nothing to rotate", file=sys.stderr)
    else:
        print(rotated)
    return EXIT_OK


# --- parser -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from kas_ray.ztdf import DEFAULT_SEGMENT_SIZE

    parser = _Parser(prog="kas-ray", description="Coalition Key Access Service (ACP-240 / ZTDF)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def state(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state-dir", type=Path, default=default_state_dir(),
                       help="local state (keys, dev IdPs, audit); default $KAS_RAY_STATE_DIR or ./.kas-ray")

    p = sub.add_parser("token", help="mint a dev access token (dev profile only)")
    state(p)
    p.add_argument("--nation", required=True, help="issuing nation (its dev IdP)")
    p.add_argument("--sub", required=True, help="subject id")
    p.add_argument("--clearance", required=True, help="national clearance name, e.g. SECRET_DEFENSE")
    p.add_argument("--coi", action="append", default=[], help="community of interest (repeatable)")
    p.add_argument("--nationality", help="countryOfAffiliation claim (default: the nation)")
    p.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    p.add_argument("--profile", default=os.environ.get(PROFILE_ENV, "dev"), choices=["dev", "prod"])
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("encrypt", help="encrypt a file into a ZTDF")
    p.add_argument("input", help="file to encrypt (- for stdin)")
    p.add_argument("-o", "--output", required=True, help="TDF to write (- for stdout)")
    p.add_argument("--kas", action="append", required=True, help="KAS URL, e.g. http://127.0.0.1:8000/usa")
    p.add_argument("--kas-key", action="append", help="public key file per --kas (PEM or {publicKey,kid} JSON)")
    p.add_argument("--key-algorithm", default="rsa:2048", choices=["rsa:2048", "rsa:4096", "ec:secp256r1"],
                   help="KAS key to fetch (default rsa:2048, the OpenTDF default)")
    p.add_argument("--oaep-hash", choices=["sha1", "sha256"], help="OAEP hash for --kas-key RSA keys")
    p.add_argument("--all-of", action="store_true", help="split the key: every KAS must release its share")
    p.add_argument("--classification", required=True)
    p.add_argument("--releasable-to", action="append", required=True, help="nation (repeatable)")
    p.add_argument("--coi", action="append", default=[], help="community of interest (repeatable)")
    p.add_argument("--embargo", help="not before this ISO-8601 UTC time, e.g. 2027-01-01T00:00:00Z")
    p.add_argument("--segment-size", type=int, default=DEFAULT_SEGMENT_SIZE)
    p.add_argument("--abac-config", help="YAML of attribute definitions (default: built-in ACP-240 set)")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_encrypt)

    p = sub.add_parser("decrypt", help="decrypt a ZTDF through its KAS")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--token", help=f"access token (prefer --token-file or ${TOKEN_ENV})")
    p.add_argument("--token-file")
    p.add_argument("--allow-kas", action="append", metavar="URL",
                   help=f"a KAS the token may be sent to (repeat; default ${ALLOWED_KAS_ENV}, comma-separated, else "
                        "the local `kas-ray serve` nations): a TDF names its own KAS, so a crafted file could name "
                        "one that collects tokens")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_decrypt)

    p = sub.add_parser("inspect", help="print a TDF's manifest and check its structure (no key needed)")
    p.add_argument("input")
    p.add_argument("--full", action="store_true", help="also print the whole manifest")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("serve", help="run every nation's KAS on local Ray Serve until Ctrl-C")
    state(p)
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--nation", action="append", help="nations (default USA, FRA, GBR)")
    p.add_argument("--profile", default=os.environ.get(PROFILE_ENV, "dev"), choices=["dev", "prod"])
    p.add_argument("--nation-config", help="YAML mapping a nation to settings (federation registry, limits, ...)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="run the coalition scenario and print the allow/deny matrix")
    state(p)
    p.add_argument("--nation", action="append", help="nations (default USA, FRA, GBR)")
    p.add_argument("--in-process", action="store_true", help="no Ray: run the KAS services in this process")
    p.add_argument("--port", type=int, help="HTTP port for the KAS (default: a free port)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("keys", help="list or rotate a nation's KAS keys (software keystore or Cloud KMS)")
    keys_sub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    def keys_common(q: argparse.ArgumentParser) -> None:
        state(q)
        q.add_argument("--nation", required=True, help="nation whose keys to manage, e.g. fra")
        q.add_argument("--backend-config", help="YAML key backend (KeyBackendConfig: kind, gcp, ...); "
                       "default: the software keystore in --state-dir")
        q.add_argument("--profile", default=os.environ.get(PROFILE_ENV, "dev"), choices=["dev", "prod"])

    q = keys_sub.add_parser("list", help="every key version and its state")
    keys_common(q)
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_keys_list)

    q = keys_sub.add_parser("rotate", help="create a new key version and publish its kid; old ones keep decrypting")
    keys_common(q)
    q.add_argument("--algorithm", default="rsa:2048", choices=sorted(_KEY_ALGORITHMS),
                   help="key to rotate (default rsa:2048)")
    q.add_argument("--oaep-hash", choices=["sha1", "sha256"], help="software RSA keys: OAEP hash "
                   "(default sha1 for rsa:2048, sha256 otherwise)")
    q.add_argument("--wait", type=float, default=120.0, help="Cloud KMS: seconds to wait for the new version "
                   "to leave PENDING_GENERATION")
    q.add_argument("--address", help="Ray cluster to tell (default $RAY_ADDRESS): drops cached public keys")
    q.add_argument("--no-wait", action="store_true", help="Cloud KMS: do not wait to invalidate caches twice")
    q.set_defaults(func=cmd_keys_rotate)

    p = sub.add_parser("audit", help="verify or rotate hash-chained audit files")
    audit_sub = p.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    q = audit_sub.add_parser("verify", help="check the hash chain; print the first bad line (exit 4) or the head")
    q.add_argument("files", nargs="+", metavar="FILE",
                   help="audit files, oldest first (rotated ones, then the live one)")
    q.add_argument("--with-rotated", action="store_true",
                   help="FILE is the live file: also check its rotated files (FILE.<timestamp>) before it")
    q.add_argument("--anchor", action="append", type=_anchor, metavar="SEQ:SHA256",
                   help="a head printed by an earlier verify: that record must still be there, unchanged")
    q.set_defaults(func=cmd_audit_verify)
    q = audit_sub.add_parser("rotate", help="start a new audit file chained to the current one (safe while serving)")
    q.add_argument("file", metavar="FILE", help="the live audit file, e.g. .kas-ray/audit/usa.jsonl")
    q.add_argument("--reason", default="operator request", help="recorded in the AUDIT_ROTATED record")
    q.set_defaults(func=cmd_audit_rotate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"kas-ray: error: {_one_line(exc)}", file=sys.stderr)
        return exc.code
    except KasRayError as exc:
        print(f"kas-ray: {exc.code}: {_one_line(exc.message)}", file=sys.stderr)
        return _exit_code(exc)
    except OSError as exc:  # an unreadable or unwritable file the command was pointed at
        print(f"kas-ray: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("kas-ray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
