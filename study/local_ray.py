"""The Ray a study runs on: a local one that only this user's processes can use, or an existing cluster.

`init(None, env_vars)` starts a single-node Ray (checked with Ray 2.60; the token needs Ray 2.52+).

Bound to loopback, 127.0.0.1 (the gRPC servers show in `ss` as the IPv4-mapped [::ffff:127.0.0.1]):
    every listener Ray starts: the GCS, the raylet (node manager and object manager), every core worker
    (the driver's, each task's and actor's: Train workers included), the dashboard (8265) and its
    head-process metrics (44227), the dashboard agent (gRPC, HTTP, metrics export), the runtime-env
    agent, and the autoscaler monitor's metrics (44217).
    How: Ray binds them to the node's IP when that IP is loopback, and otherwise to every interface
    (or the machine's address). `ray.init(_node_ip_address="127.0.0.1")` alone is not enough: ray.init
    "resolves" a loopback address to the machine's routable one (services.resolve_ip_for_localhost)
    unless Ray is in its single-machine mode (ray_constants.ENABLE_RAY_CLUSTER false, from
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray's default on macOS and Windows). Ray reads that variable
    when `ray` is first imported; `init` sets both the variable (for the processes Ray spawns) and the
    imported constant (the study imports Ray Tune before it starts Ray), so nothing has to be in the
    environment before `import ray`. The other Ray processes get the node's IP on their command lines.

Protected by Ray's token as well: loopback keeps other machines out, not the other users of this one.
Every gRPC server (GCS, raylet, object manager, core workers, dashboard agent) and every HTTP server
but the metrics ones (the dashboard with its state and job APIs, the dashboard agent, the runtime-env
agent) refuses a request without `authorization: Bearer <token>`: gRPC answers UNAUTHENTICATED
("InvalidAuthToken: Authentication token is missing or incorrect"; `ray.init(address=...)` retries,
then raises ConnectionError), HTTP 401 (a wrong token: 403). Ray 2.60 turns the token on by itself for
a local `ray.init()`, but keeps it in ~/.ray/auth_token (0644 under the usual umask, reused by every
later cluster of the user, and RAY_AUTH_MODE=disabled in the environment turns it off); here
RAY_AUTH_MODE=token is set explicitly and the token is a fresh random one per process, in a 0600 file
in a 0700 directory (`token_path()`), named by RAY_AUTH_TOKEN_PATH: Ray's processes inherit the path,
not the secret (RAY_AUTH_TOKEN, which would win over the file, is removed from this process's
environment). The file is deleted at exit, after Ray is shut down. Ray caches the auth mode and the
token in its C++ config; `init` reloads both, so this too works after `import ray`.
Not protected by the token, loopback only: the Prometheus endpoints (44217, 44227, the agent's metrics
export port), which Ray serves without authentication (read-only).

To reach this Ray from another shell (`ray status`, `ray list ...`), that shell needs the same three
variables: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<token_path()>,
and `--address 127.0.0.1:<GCS port>`; the dashboard page asks for the token once.

Not Ray's, so not covered: torch.distributed's TCPStore, which Ray Train's rank-0 worker opens on
MASTER_PORT, listens on every interface without authentication while a trial trains (MASTER_ADDR is
127.0.0.1 here, so the ranks use loopback; torch has no bind-address setting for it).

`init(address, env_vars)` with an address (or $RAY_ADDRESS, or "auto") connects to that cluster and
changes nothing, neither about the cluster nor about how this process connects (Ray's own RAY_AUTH_*
settings and ~/.ray/auth_token apply).

Either way `env_vars` reach every worker (the job's runtime_env).
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from typing import Iterable, NamedTuple

LOOPBACK = "127.0.0.1"
_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # read by ray._private.ray_constants at import
_LOCAL_ADDRESSES = (None, "", "local")  # what ray.init takes as "start a new local cluster"
_TOKEN_DIR = "mmscale-ray-auth-"
logger = logging.getLogger(__name__)


def starts_local(address: str | None) -> bool:
    """Whether `init(address, ...)` starts a local Ray on this machine (no address, no RAY_ADDRESS, or "local")
    rather than joining a cluster."""
    return (address or os.environ.get("RAY_ADDRESS") or None) in _LOCAL_ADDRESSES


def init(address: str | None, env_vars: dict[str, str]) -> None:
    """Connect to `address` (an existing cluster, unchanged), or start a local Ray bound to loopback
    with token authentication and the dashboard on 127.0.0.1 (see the module's docstring)."""
    common = dict(runtime_env={"env_vars": dict(env_vars)}, log_to_driver=True, configure_logging=True,
                  logging_level="WARNING")
    if not starts_local(address):
        address = address or os.environ.get("RAY_ADDRESS")
        import ray

        ray.init(address=address, **common)
        return

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():  # a new token would lock us out of it
        raise RuntimeError("Ray is already initialized in this process")
    _secure_environment()
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # the import may have come before the variable was set
    ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=True, dashboard_host=LOOPBACK,
             **common)
    node = ray._private.worker._global_node
    if not _is_loopback(node.node_ip_address):  # a Ray that changed how it picks the node's address
        ray.shutdown()
        raise RuntimeError(f"the local Ray took {node.node_ip_address} as its address, not loopback")
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:  # Ray < 2.52: no token authentication, loopback only
        logger.warning("this Ray (%s) has no token authentication: the local Ray is only bound to loopback",
                       ray.__version__)
        return
    if not is_token_auth_enabled():
        ray.shutdown()
        raise RuntimeError("the local Ray started without token authentication")
    logger.info("local Ray: dashboard http://%s, its token in %s (deleted at exit)", node.webui_url,
                token_path())


def token_path() -> str | None:
    """The file holding the local Ray's token (what the dashboard page asks for), while it runs."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return path if path and os.path.basename(os.path.dirname(path)).startswith(_TOKEN_DIR) else None


def _secure_environment() -> None:
    """Single-machine mode and token authentication for the Ray this process is about to start."""
    os.environ[_SINGLE_MACHINE] = "0"
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.pop("RAY_AUTH_TOKEN", None)  # would win over the file below
    token_dir = tempfile.mkdtemp(prefix=_TOKEN_DIR)  # 0700
    path = os.path.join(token_dir, "token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = path
    atexit.register(_forget_token, token_dir)
    if "ray._raylet" in sys.modules:  # Ray caches its config (the auth mode) and the token: reload both
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def _forget_token(token_dir: str) -> None:
    # Registered after Ray's own atexit shutdown, so it runs first: shut Ray down before the file goes
    # (Ray's processes read the token when they start, and Ray may start some up to the end).
    if "ray" in sys.modules:
        import ray

        ray.shutdown()
    shutil.rmtree(token_dir, ignore_errors=True)


class Listener(NamedTuple):
    """A listening TCP socket: `process` is "name[pid]" as `ss` shows it."""

    process: str
    address: str
    port: int

    @property
    def pid(self) -> int:
        return int(self.process.rsplit("[", 1)[1].rstrip("]"))

    @property
    def loopback(self) -> bool:
        return _is_loopback(self.address)


def listeners(pids: Iterable[int] | None = None) -> list[Listener]:
    """The TCP listeners of `pids` (default: this process and its descendants, i.e. a local Ray that
    this process started: GCS, raylet, dashboard, agents, workers), from `ss -ltnp`.

    A socket shared by several processes is listed once per process.
    """
    if pids is None:
        pids = descendants(os.getpid())
    wanted = set(pids)
    out = subprocess.run([_ss(), "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 5 or fields[0] != "LISTEN":
            continue
        host, _, port = fields[3].rpartition(":")
        host = host.strip("[]").split("%")[0]  # [::1] -> ::1, 127.0.0.1%lo -> 127.0.0.1
        for name, pid in re.findall(r'\("([^"]*)",pid=(\d+)', line):
            if int(pid) in wanted:
                found.append(Listener(f"{name}[{pid}]", host, int(port)))
    return sorted(set(found), key=lambda l: (l.process, l.port))


def _ss() -> str:
    return shutil.which("ss") or "/usr/bin/ss"


def descendants(pid: int) -> set[int]:
    """`pid` and every process below it (a local Ray: its GCS, raylet, dashboard, agents and workers)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return {pid} | {p.pid for p in root.children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:  # "*" (every interface) and the like
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


_SECRET_PARAMS = r"password|passwd|pwd|pass|token|access_token|secret|api_key|apikey|key"


def mask_credentials(uri: str) -> str:
    """`uri` fit to print: the password of its user info and secret query parameters become ***.

    http://user:pass@host:5000 -> http://user:***@host:5000 (the same for https, postgresql[+driver],
    mysql, databricks, ...); a user info without a password (often a bare token: https://TOKEN@host)
    is masked whole; ?password=..., &token=... and the like are masked too. Everything else (paths,
    sqlite:///..., file:..., databricks://profile) is returned unchanged.
    """
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)(.*)$", uri, re.S)
    if not m:
        return uri
    scheme, netloc, rest = m.groups()
    userinfo, at, host = netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if colon else f"***@{host}"
    rest = re.sub(rf"([?&;](?:{_SECRET_PARAMS})=)[^&;#]*", r"\1***", rest, flags=re.I)
    return scheme + netloc + rest
