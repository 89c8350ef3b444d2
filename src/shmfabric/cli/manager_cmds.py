"""`shmfabric up | down | status | top | reload`: run a topology under the service manager.

`up` runs in the foreground until Ctrl-C (or `--duration`), or in the background with `--detach`.
A running manager writes a state file (`$SHMFABRIC_STATE_DIR`, else `$XDG_RUNTIME_DIR/shmfabric`,
else `/tmp/shmfabric-UID`) named after its fabric, holding its pid and API address (and the path of
its API token file, never the token); the other verbs find the manager through it (`--fabric NAME`
when several run) or take `--api URL` (with `--api-token-file PATH` or $SHMFABRIC_API_TOKEN_FILE
for a manager whose API needs a token). The state directory is made 0700 and used only if it is a
real directory of this user's that no one else may write (`down` signals the pid a state file
names); it is opened once and used through that fd (StateDir), and a state file is trusted only if
it is this user's and no one else may write it; state files are 0600.

The token goes to the manager only: through a state file, only on a connection to a listening
socket of the manager's own process (`_check_listener`; a stopping manager marks its state file
stopping before it lets its port go); never through a proxy; never after a redirect. `--api URL`
is the user's word: the token goes to whatever listens there.
"""
from __future__ import annotations

import argparse
import errno
import functools
import http.client
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from shmfabric.cli.main import CliError, CliRetry, add_json_flag, console


# -- state files -------------------------------------------------------------------------------------
def state_dir() -> Path:
    """Where running managers leave their state files."""
    env = os.environ.get("SHMFABRIC_STATE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "shmfabric" if xdg else Path(f"/tmp/shmfabric-{os.getuid()}")


class StateDir:
    """The state directory, opened once (O_DIRECTORY | O_NOFOLLOW) and checked through that fd (its
    owner and mode, by fstat). Every state file is then listed, opened, written and removed relative
    to the fd, never by its path again: a directory swapped in under the path afterwards (by a user
    who controls its parent, e.g. with renameat2(RENAME_EXCHANGE) in a loop) is never read. `fd` is
    None when the directory does not exist (it then holds no state files). `path` is for messages."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self.fd = path, fd

    def __enter__(self) -> "StateDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def json_names(self) -> list[str]:
        """The names of the `*.json` files in the directory (state files, or what looks like one)."""
        if self.fd is None:
            return []
        try:
            return sorted(n for n in os.listdir(self.fd) if n.endswith(".json"))
        except OSError as exc:
            raise _state_dir_error(exc, self.path) from None

    def open(self, name: str, flags: int, mode: int = 0o600) -> int:
        """os.open of `name` in the directory (never through a symbolic link)."""
        if self.fd is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(self.path / name))
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=self.fd)

    def unlink(self, name: str) -> None:
        if self.fd is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(self.path / name))
        os.unlink(name, dir_fd=self.fd)


def open_state_dir(create: bool = False) -> StateDir:
    """The state directory (a StateDir), made 0700 first if `create` (`up`), then used only if it is a
    directory (not a symbolic link) owned by this user and not writable by group or others: in
    another's (say a /tmp/shmfabric-UID someone made first) state files could be planted or replaced,
    and `down` signals the pid a state file names. It is opened once and checked on that fd. Without
    `create`, one that does not exist is returned without an fd (it holds no state files). CliError
    names the directory and SHMFABRIC_STATE_DIR."""
    d = state_dir()
    made = False
    if create:
        try:
            d.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _state_dir_error(exc, d) from None
        try:
            d.mkdir(mode=0o700)
            made = True
        except FileExistsError:
            pass  # checked below
        except OSError as exc:
            raise _state_dir_error(exc, d) from None
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        if create:  # removed as it was made
            raise _state_dir_error(exc, d) from None
        return StateDir(d, None)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            try:
                is_link = stat.S_ISLNK(os.lstat(d).st_mode)
            except OSError:
                is_link = exc.errno == errno.ELOOP
            fd = None
            problem = "is a symbolic link" if is_link else "is not a directory"
        else:
            raise _state_dir_error(exc, d) from None
    else:
        try:
            problem = _state_dir_problem(d, fd, made)
        except BaseException:
            os.close(fd)
            raise
        if problem is None:
            return StateDir(d, fd)
        os.close(fd)
    raise CliError(f"state directory {d} {problem}: not used, since the state files `down` trusts could be "
                   "planted there; remove it (it is made again, 0700; a manager still running from it can be "
                   "stopped with `down --api URL`), or set SHMFABRIC_STATE_DIR to a directory of yours that "
                   "only you may write")


def _state_dir_problem(d: Path, fd: int, made: bool) -> str | None:
    """What is wrong with the state directory open at `fd` (None: nothing; one of ours that others
    could write but that holds only our files is made 0700 first, with a line saying so)."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise _state_dir_error(exc, d) from None
    uid = os.getuid()
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != uid:
        try:
            import pwd

            user = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            user = "no user name"
        return f"belongs to uid {st.st_uid} ({user}), not to you (uid {uid})"
    if made:
        try:
            os.fchmod(fd, 0o700)  # the mode, whatever the umask
        except OSError as exc:
            raise _state_dir_error(exc, d) from None
        return None
    if not st.st_mode & 0o022:
        return None
    # Ours, but others may write in it (made by an older version under umask 002, say): made 0700 now,
    # and used if everything in it is ours too (a file someone else planted or replaced while it was
    # open to them would be theirs).
    who = "others" if st.st_mode & 0o002 else "its group"
    problem = f"was writable by {who} (mode {st.st_mode & 0o7777:o})"
    try:
        foreign = [n for n in os.listdir(fd) if os.stat(n, dir_fd=fd, follow_symlinks=False).st_uid != uid]
        if not foreign:  # (checked first: a directory refused stays refused, left as it was)
            os.fchmod(fd, 0o700)
    except OSError as exc:
        raise _state_dir_error(exc, d) from None
    if not foreign:
        print(f"shmfabric: state directory {d} {problem}: made 0700", file=sys.stderr)
        return None
    return problem + f", and holds files that are not yours ({', '.join(sorted(foreign)[:3])})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not running
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


STATE_KIND = "shmfabric-manager"  # marks a state file this module wrote: only those are ever removed


def _proc_start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22): a pid reused by
    another process has another one."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _check_fabric_arg(name: str | None) -> None:
    """`--fabric NAME` names a state file: the same rule as `fabric.name` in a config (so no path)."""
    if name is None:
        return
    from pydantic import ValidationError

    from shmfabric.manager.config import FabricSection

    try:
        FabricSection(name=name)
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise CliError(f"--fabric {name!r}: {msg}") from None


_STATE_MAX_BYTES = 1 << 16  # a state file is a few hundred bytes


def _state_file_problem(st: os.stat_result) -> str | None:
    """Why a state file (fstat of it) may not be trusted: not a regular file, not this user's, or
    writable by its group or others (None: it may)."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    uid = os.geteuid()
    if st.st_uid != uid:
        return f"belongs to uid {st.st_uid}, not to you (uid {uid})"
    if st.st_mode & 0o022:
        who = " and ".join(w for w, bits in (("its group", 0o020), ("others", 0o002)) if st.st_mode & bits)
        return f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _read_state(sd: StateDir, name: str, asked: bool = False) -> dict | None:
    """The content of the state file `name` in `sd` if it is one (a JSON object naming a fabric and a
    pid), else None: files of others in the state directory are skipped, never read as ours. It is
    opened relative to the directory's fd (never through a symbolic link) and must be this user's and
    writable by no one else (fstat of the open file): one that is not is skipped with a warning on
    stderr, or, `asked` (the file of the fabric the user named), refused in one line (CliError)."""
    try:
        fd = sd.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            return None
        problem = "is a symbolic link"
    else:
        try:
            problem = _state_file_problem(os.fstat(fd))
            raw = os.read(fd, _STATE_MAX_BYTES + 1) if problem is None else b""
        except OSError:
            return None
        finally:
            os.close(fd)
    if problem is not None:
        msg = f"state file {sd.path / name} {problem}: not trusted"
        if asked:
            raise CliError(f"{msg}; remove it (a manager's state files are its user's own, mode 0600)")
        print(f"shmfabric: warning: {msg}, skipped", file=sys.stderr)
        return None
    try:
        st = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(st, dict) or not isinstance(st.get("fabric"), str):
        return None
    pid = st.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    return st


def _manager_alive(st: dict) -> bool:
    """Whether the process the state names is that manager still: alive, and the same process (its
    start time as recorded; a file without one: its command line runs shmfabric), not a reused pid."""
    pid = st["pid"]
    if not _pid_alive(pid):
        return False
    recorded = st.get("start_time")
    if isinstance(recorded, int):
        return _proc_start_time(pid) == recorded
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"shmfabric" in f.read()
    except OSError:
        return True  # not ours to read (another user's): assume it is


def _remove_stale(sd: StateDir, name: str, st: dict) -> None:
    """Remove a state file left by a manager that is gone, if this module wrote it (it says so)."""
    if st.get("kind") != STATE_KIND:
        return
    try:
        sd.unlink(name)
    except OSError:
        return
    print(f"shmfabric: removed the stale state file {sd.path / name} (manager pid {st['pid']} of fabric "
          f"{st['fabric']!r} is gone)", file=sys.stderr)


def _write_state(sd: StateDir, name: str, data: dict) -> None:
    """Write the state file `name` (0600) relative to the directory's fd, whole or not at all."""
    tmp = name.removesuffix(".json") + ".tmp"
    try:
        fd = sd.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, 0o600)  # its owner's only, also when a .tmp was left behind
            f.write(json.dumps(data, indent=1))
        os.replace(tmp, name, src_dir_fd=sd.fd, dst_dir_fd=sd.fd)  # readers never see half a file
    except OSError as exc:
        raise _state_dir_error(exc, sd.path) from None


def _own_state(sd: StateDir, name: str) -> dict | None:
    """The state file `name` if it is this process's (a manager's own), else None."""
    try:
        st = _read_state(sd, name)
    except CliError:
        return None
    return st if st is not None and st.get("pid") == os.getpid() else None


def _find_state(args: argparse.Namespace) -> dict:
    """The state of the manager the user means; CliError says how to name it."""
    fabric = getattr(args, "fabric", None)
    _check_fabric_arg(fabric)
    with open_state_dir() as sd:
        d = sd.path
        names = [f"{fabric}.json"] if fabric else sd.json_names()
        found = []
        for name in names:
            st = _read_state(sd, name, asked=bool(fabric))
            if st is None or (fabric and st["fabric"] != fabric):
                continue  # not a state file of ours
            if _manager_alive(st):
                found.append(st)
            else:
                _remove_stale(sd, name, st)  # left by a manager that was killed
    if not found:
        what = f"for fabric {fabric!r} " if fabric else ""
        raise CliError(f"no running manager {what}found (state files in {d}); start one with "
                       "`shmfabric up CONFIG`, or give --api URL")
    if len(found) > 1:
        raise CliError("several managers run (fabrics " + ", ".join(s["fabric"] for s in found)
                       + "); choose one with --fabric NAME")
    return found[0]


def _api_url(args: argparse.Namespace) -> str:
    return str(_api_target(args))


TOKEN_FILE_ENV = "SHMFABRIC_API_TOKEN_FILE"


class ApiTarget(str):
    """A management API URL (a str, as before) with the bearer token to send it (None: none) and the
    token file it came from (for messages). Found through a state file, it also carries the manager's
    pid (and start time): the token is sent only on a connection to a listening socket of that
    process (see `_check_listener`)."""

    token: str | None = None
    token_file: str | None = None
    listener_pid: int | None = None
    listener_start_time: int | None = None
    fabric: str | None = None


def _api_target(args: argparse.Namespace) -> ApiTarget:
    """The URL of the manager the user means, with its token: with `--api URL`, the token in
    `--api-token-file`, else in $SHMFABRIC_API_TOKEN_FILE, else none; through a state file, the token
    file the manager recorded there (`--api-token-file` overrides it). CliError, one line naming the
    token file, if it cannot be used.

    `--api URL` is the user's word: the token goes to whatever listens there (if the manager is not
    running, or stopped a moment ago, that may be another local user's program that took the port).
    Through a state file, the token is sent only once the connection is known to reach a listening
    socket of the manager's process (`_check_listener`)."""
    given = getattr(args, "api_token_file", None)
    pid = start_time = fabric = None
    if getattr(args, "api", None):
        url = args.api
        url = url if url.startswith("http") else f"http://{url}"
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 -- raises ValueError for a port out of range or not a number
        except ValueError as exc:
            raise CliError(f"--api {args.api!r}: not a URL ({exc}); give http://HOST:PORT") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CliError(f"--api {args.api!r}: not a URL; give http://HOST:PORT")
        if given:
            token_file, origin = given, "given by --api-token-file"
        else:
            token_file, origin = os.environ.get(TOKEN_FILE_ENV) or None, f"given by {TOKEN_FILE_ENV}"
    else:
        st = _find_state(args)
        if st.get("stopping"):
            raise CliError(f"the manager of fabric {st['fabric']!r} (pid {st['pid']}) is stopping; its API is "
                           "closed")
        if not st.get("api"):
            raise CliError(f"the manager of fabric {st['fabric']!r} runs without a management API (api: null)")
        url = st["api"]
        pid, fabric = st["pid"], st["fabric"]
        start_time = st.get("start_time") if isinstance(st.get("start_time"), int) else None
        recorded = st.get("api_token_file")
        if given:
            token_file, origin = given, "given by --api-token-file"
        else:
            token_file = recorded if isinstance(recorded, str) and recorded else None
            origin = f"named by the state file of the manager of fabric {st['fabric']!r}"
    target = ApiTarget(url)
    target.listener_pid, target.listener_start_time, target.fabric = pid, start_time, fabric
    if token_file:
        from shmfabric.manager.api import TokenFileError, load_token

        try:
            target.token = load_token(token_file, check_owner=False)
        except TokenFileError as exc:
            raise CliError(f"{exc} ({origin})") from None
        target.token_file = token_file
    return target


class ApiAuthError(CliError):
    """The management API refused the request: no token, or not its token (401)."""


class ListenerNotManagerError(CliError):
    """The port of a manager found through its state file is not held by that manager: nothing sent."""


# -- who listens on a port (/proc) ------------------------------------------------------------------
def _proc_net_address(hex_addr: str):
    """An address of /proc/net/tcp{,6} (hex, each 32-bit word in host order: little-endian here)."""
    import ipaddress

    raw = bytes.fromhex(hex_addr)
    return ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))


def _listening_inodes(host: str, port: int) -> set[int]:
    """Inodes of the TCP sockets in LISTEN state on `port` that a connection to host:port could reach:
    bound to `host`, or to a wildcard address (0.0.0.0, ::), or to any address if `host` is a wildcard."""
    import ipaddress

    want = ipaddress.ip_address(host)
    out: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "0A":  # 0A: TCP_LISTEN
                continue
            addr_hex, _, port_hex = fields[1].partition(":")
            try:
                if int(port_hex, 16) != port:
                    continue
                addr = _proc_net_address(addr_hex)
            except ValueError:
                continue
            mapped = getattr(addr, "ipv4_mapped", None)
            if want.is_unspecified or addr.is_unspecified or addr == want or mapped == want:
                out.add(int(fields[9]))
    return out


def _socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process `pid` holds (its /proc/PID/fd links `socket:[INODE]`)."""
    out: set[int] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:[") and link.endswith("]"):
            out.add(int(link[8:-1]))
    return out


def _check_listener(target: ApiTarget, sock) -> None:
    """Called once `sock` is connected, before a byte is sent: the listening socket the connection
    reached must be the manager's (the pid its state file names, still the same process). When a
    manager stops, its port is free for anyone to take; what listens there then is another's program,
    and it must not get the token. Checked after the connection is made: a listener that was the
    manager's then reached the manager (a port another took later cannot have taken this connection).
    ListenerNotManagerError (one line) otherwise."""
    host, port = sock.getpeername()[:2]
    pid = target.listener_pid
    why = None
    try:
        if target.listener_start_time is not None and _proc_start_time(pid) != target.listener_start_time:
            why = "that process is gone"
        else:
            listening = _listening_inodes(host, port)
            ours = _socket_inodes(pid)
            if not listening:
                why = "nothing listens there"
            elif not listening <= ours:
                why = "another process listens there"
    except OSError as exc:
        why = f"its sockets cannot be read ({exc.strerror or exc})"
    if why:
        raise ListenerNotManagerError(
            f"not sending the API token to {target}: port {port} is not held by the manager of fabric "
            f"{target.fabric!r} (pid {pid}): {why} (a manager that is stopping lets its port go); nothing was sent")


class _CheckedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection that calls `check(sock)` once connected, before anything is sent."""

    def __init__(self, *args, check, **kwargs):
        super().__init__(*args, **kwargs)
        self._check = check

    def connect(self) -> None:
        super().connect()
        try:
            self._check(self.sock)
        except BaseException:
            self.close()
            raise


class _CheckedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, check) -> None:
        super().__init__()
        self._check = check

    def http_open(self, req):
        return self.do_open(functools.partial(_CheckedHTTPConnection, check=self._check), req)


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an error naming where it pointed: urllib would follow it and send the
    Authorization header along, to any host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        try:
            fp.close()
        except Exception:
            pass
        raise CliError(f"{req.full_url} answered {code} with a redirect to {headers.get('Location', newurl)!s}: "
                       "not followed (the API token goes to the management API only); give the manager's own "
                       "URL")


def _opener(url: str, token: str | None) -> urllib.request.OpenerDirector:
    """No proxy (http_proxy & co. would get the token in clear), no redirect followed, and, for a
    manager found through its state file, the check that its port is still its own."""
    handlers: list = [urllib.request.ProxyHandler({}), _RefuseRedirects()]
    if token is not None and getattr(url, "listener_pid", None) is not None:
        handlers.append(_CheckedHTTPHandler(functools.partial(_check_listener, url)))
    return urllib.request.build_opener(*handlers)


def api_call(url: str, path: str, body: dict | None = None, timeout: float = 60.0,
             token: str | None = None, *, send_token: bool = True) -> dict:
    """GET (body None) or POST JSON to the management API; CliError with the server's message. The
    bearer token sent is `token`, else the one `url` carries (an ApiTarget from `_api_target`); none
    with `send_token=False`. Never through a proxy, never following a redirect; to a manager found
    through its state file, only on a connection to that manager's own listener."""
    data = None if body is None else json.dumps(body).encode()
    token = token if token is not None else getattr(url, "token", None)
    if not send_token:
        token = None
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        req = urllib.request.Request(url.rstrip("/") + path, data=data, method="GET" if body is None else "POST",
                                     headers=headers)
    except ValueError as exc:  # e.g. "http://[::1" (Invalid IPv6 URL)
        raise CliError(f"{url} is not a URL of the management API ({exc}); give http://HOST:PORT") from None
    try:
        with _opener(url, token).open(req, timeout=timeout) as resp:
            raw = resp.read()
        try:
            return json.loads(raw)
        except ValueError:
            raise CliError(f"{url} answered {path} with something other than JSON; "
                           "is it a shmfabric manager's API?") from None
    except urllib.error.HTTPError as exc:
        try:
            msg = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            msg = exc.reason
        if exc.code == 401:
            token_file = getattr(url, "token_file", None)
            if token is None:
                raise ApiAuthError(f"the management API at {url} needs a token: give its token file with "
                                   f"--api-token-file PATH or {TOKEN_FILE_ENV}") from None
            raise ApiAuthError(f"the management API at {url} refused the token"
                               + (f" of {token_file}" if token_file else "") + f": {msg}") from None
        raise CliError(str(msg)) from None
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"cannot reach the management API at {url}: {getattr(exc, 'reason', exc)}") from None
    except ValueError as exc:  # http.client.InvalidURL, e.g. a port that is not a number
        raise CliError(f"{url} is not a URL of the management API ({exc}); give http://HOST:PORT") from None


# -- up ----------------------------------------------------------------------------------------------
def _load(path: str):
    """The schema, the cross references and each node's function and its config, all checked before any
    process starts; every problem found is reported together."""
    from shmfabric.functions.registry import load as load_function
    from shmfabric.manager.config import ConfigError, load_topology

    try:
        return load_topology(path, resolve=load_function)
    except ConfigError as exc:
        # one problem, one line; several: a heading, then one line each
        sep = "\n" if "\n" in str(exc) else " "
        raise CliError(f"invalid config:{sep}{exc}") from None


def _override(topo, api: str | None, fabric: str | None):
    """The topology with --api / --fabric applied, each validated like the file's own value; an error
    names the option it is about."""
    if api is None and fabric is None:
        return topo
    from pydantic import ValidationError

    from shmfabric.manager.config import Topology

    data = topo.model_dump()
    if api is not None:
        if isinstance(data.get("api"), dict):  # `api: {listen, token_file}`: --api moves the listener only
            data["api"] = {**data["api"], "listen": api}
        else:
            data["api"] = api
    if fabric is not None:
        data["fabric"] = {**data["fabric"], "name": fabric}
    try:
        return Topology.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            loc = tuple(err.get("loc", ()))
            if loc[:1] == ("api",):
                problems.append(f"--api {api!r}: {msg}")
            elif loc[:2] == ("fabric", "name"):
                problems.append(f"--fabric {fabric!r}: {msg}")
            else:
                problems.append(msg)
        raise CliError("; ".join(problems)) from None


def cmd_up(args: argparse.Namespace) -> int:
    from shmfabric.manager.config import DEFAULT_CONFIG

    if args.duration is not None and not args.duration > 0:
        raise CliError(f"--duration {args.duration:g}: give the seconds to run, a number above 0 "
                       "(or leave it out to run until Ctrl-C)")
    path = args.config or str(DEFAULT_CONFIG)
    if not args.config and not DEFAULT_CONFIG.exists():
        raise CliError("no CONFIG given and the built-in examples/edge.yaml is not installed; give a file")
    topo = _load(path)
    topo = _override(topo, args.api, args.fabric)
    _check_token_file(topo, announce=not args.quiet)
    with open_state_dir(create=True) as sd:
        name = f"{topo.fabric.name}.json"
        old = _read_state(sd, name, asked=True)
        if old is not None:
            if _manager_alive(old):
                raise CliError(f"a manager (pid {old['pid']}) already runs fabric {topo.fabric.name!r}; "
                               f"stop it with `shmfabric down --fabric {topo.fabric.name}` first")
            _remove_stale(sd, name, old)
        if args.detach:
            return _detach(args, path, topo, sd, name)
        return _foreground(args, path, topo, sd, name)


def _check_token_file(topo, announce: bool = True) -> str | None:
    """The API's token (None: `api:` has no token_file), from its file, made first if missing (0600, a
    random token; said on stderr when `announce`). CliError, one line naming the file, if it cannot be
    made or used (e.g. its group or others may read it). Checked by `up` before anything starts (and
    before --detach, so that the refusal is one line in the shell)."""
    from shmfabric.manager.api import TokenFileError, ensure_token_file, load_token
    from shmfabric.manager.config import api_listen, api_token_file

    path = api_token_file(topo.api) if api_listen(topo.api) else None
    if path is None:
        return None
    try:
        created = ensure_token_file(path)
        token = load_token(path)
    except TokenFileError as exc:
        raise CliError(str(exc)) from None
    if created and announce:
        print(f"shmfabric: created the API token file {path} (mode 0600, a random token)", file=sys.stderr)
    return token


def _state_dir_error(exc: OSError, where: Path) -> CliError:
    return CliError(f"cannot write to the state directory {where}: {exc.strerror or exc}; make it writable, or "
                    "set SHMFABRIC_STATE_DIR to a writable directory")


def _detach(args: argparse.Namespace, path: str, topo, sd: StateDir, name: str) -> int:
    log_name = f"{topo.fabric.name}.log"
    log = sd.path / log_name
    try:
        # the manager's own output (errors, SIGHUP reloads): its owner's to read (0600 when created)
        out = os.fdopen(sd.open(log_name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
    except OSError as exc:
        raise _state_dir_error(exc, sd.path) from None
    # -P: the directory `up` ran in is not put on sys.path (a json.py there would be imported)
    argv = [sys.executable, "-P", "-m", "shmfabric", "up", str(Path(path).resolve()), "--quiet"]
    if args.api:
        argv += ["--api", args.api]
    if args.fabric:
        argv += ["--fabric", args.fabric]
    if args.duration is not None:
        argv += ["--duration", str(args.duration)]
    with out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            try:
                with os.fdopen(sd.open(log_name, os.O_RDONLY), "rb") as f:
                    tail = f.read().decode(errors="replace").strip().splitlines()[-8:]
            except OSError:
                tail = []
            raise CliError(f"the manager exited with status {proc.returncode} at start:\n" + "\n".join(tail))
        try:
            st = _read_state(sd, name) or {}
            if st.get("pid") == proc.pid:
                if args.quiet:
                    pass  # --quiet: nothing, as in the foreground
                elif getattr(args, "json", False):
                    print(json.dumps(st))
                else:
                    token = f" (token in {st['api_token_file']})" if st.get("api_token_file") else ""
                    print(f"fabric {st['fabric']} up in the background: manager pid {st['pid']}, "
                          f"API {st.get('api')}{token}, log {log}")
                return 0
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    proc.terminate()
    raise CliError(f"the manager did not come up within {args.start_timeout:g}s; see {log}")


def _foreground(args: argparse.Namespace, path: str, topo, sd: StateDir, state_name: str) -> int:
    from shmfabric.manager.api import ApiServer, make_registry
    from shmfabric.manager.config import api_listen, api_token_file
    from shmfabric.manager.supervisor import Supervisor, SupervisorError

    # read again here (a detached manager is another process): refused before anything starts
    token = _check_token_file(topo, announce=False)
    listen, token_file = api_listen(topo.api), api_token_file(topo.api)
    stop = threading.Event()
    reload_due = threading.Event()
    # Ctrl-C, `shmfabric down`, systemd stop; `kill -HUP`, systemd ExecReload: the handlers take no lock
    # (see _SignalRelay): a signal that lands inside Event.set() would otherwise wait for itself
    relay = _SignalRelay(stop, reload_due)
    old_handlers = {s: signal.signal(s, relay.on_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    old_handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, relay.on_hup)
    live_view = getattr(args, "live", False) and not args.quiet and not getattr(args, "json", False)
    # each event also as a line on stderr (the detached manager's log, systemd's journal): from the
    # start with --quiet (as --detach runs), else after the banner (its first line); not under the
    # live view, which redraws the terminal
    sup = Supervisor(topo, source=path, log_dir=sd.path / f"{topo.fabric.name}-logs",
                     # --api pins the whole `api:` (address and token file) over every file reloaded
                     pinned={"fabric": args.fabric, "api": topo.api if args.api else None},
                     event_stream=sys.stderr if args.quiet else None)
    api = metrics_srv = state = None
    metrics_addr = topo.metrics
    if args.quiet:
        say = lambda *a, **k: None  # noqa: E731
    elif getattr(args, "json", False):  # stdout carries only the JSON summary
        say = lambda *a, **k: print(*a, **k, file=sys.stderr)  # noqa: E731
    else:
        say = print
    try:
        try:
            sup.start()
        except SupervisorError as exc:
            raise (CliRetry if exc.retry else CliError)(sup.redact_text(str(exc))) from None
        registry = make_registry(sup)
        if listen:
            try:
                api = ApiServer(sup, listen, on_shutdown=stop.set, registry=registry, token=token).start()
            except OSError as exc:
                raise CliError(f"cannot listen on api {listen}: {exc.strerror}; choose another address") from None
        if topo.metrics:
            from prometheus_client import start_http_server

            host, _, port = topo.metrics.rpartition(":")
            try:
                metrics_srv = start_http_server(int(port), host, registry=registry)
            except OSError as exc:
                raise CliError(f"cannot listen on metrics {topo.metrics}: {exc.strerror}") from None
            if isinstance(metrics_srv, tuple):  # port 0: the port the system chose
                metrics_addr = f"{host}:{metrics_srv[0].server_address[1]}"
        state = {"kind": STATE_KIND, "fabric": topo.fabric.name, "pid": os.getpid(),
                 "start_time": _proc_start_time(os.getpid()), "api": api.url if api else None,
                 # where the API's token is (never the token itself), for the CLI
                 "api_token_file": token_file if api and token else None,
                 "metrics": metrics_addr, "config": str(Path(path).resolve()),
                 "logs": str(sup.log_dir), "started": time.time()}
        _write_state(sd, state_name, state)
        n = sum(len(x.instances) for x in sup.nodes.values())
        say(f"fabric {topo.fabric.name} up: {n} instances of {len(sup.nodes)} nodes"
            + (f", API {api.url}" if api else "") + (f" (token in {token_file})" if api and token else "")
            + (f", metrics http://{metrics_addr}/metrics" if metrics_addr else "")
            + ("" if args.duration else "; Ctrl-C stops everything"), flush=True)
        live = _LiveView(sup, stop) if getattr(args, "live", False) and say is print else None
        if not live_view:
            sup.event_stream = sys.stderr
        threading.Thread(target=_reload_on_hup, args=(sup, reload_due, stop), name="shmfabric-sighup",
                         daemon=True).start()
        try:
            sup.run(stop, args.duration)
        finally:
            if live:
                live.close()
                print()
        say("stopping: sources first, each node drains its input ...", flush=True)
        settled = sup.quiesce()
        final = _drained(sup.status()) if settled else sup.status()
    finally:
        # The state file first: once the API listener is closed its port is anyone's to take, and a CLI
        # that still found the API in the state file would send the token there. Marked stopping (no
        # API) while the nodes stop, so that `up` still refuses and `down` still waits; removed at the end.
        if api and _own_state(sd, state_name) is not None:
            try:
                _write_state(sd, state_name, {**(state or {}), "api": None, "api_token_file": None,
                                              "stopping": True})
            except CliError:
                try:
                    sd.unlink(state_name)
                except OSError:
                    pass
        if api:
            api.close()
        if metrics_srv and isinstance(metrics_srv, tuple):
            metrics_srv[0].shutdown()
        sup.stop()
        if _own_state(sd, state_name) is not None:
            try:
                sd.unlink(state_name)
            except OSError:
                pass
        for s, h in old_handlers.items():
            signal.signal(s, h)
        relay.close()
    if not args.quiet:
        _print_summary(final, getattr(args, "json", False))
    return 0


class _SignalRelay:
    """Signal handlers that take no lock. A Python signal handler runs in the main thread between two
    bytecodes, possibly inside `Event.set()` (whose lock is not reentrant) or inside the handler
    itself: one that called `Event.set()` deadlocked, and a burst of signals nested handlers until
    RecursionError. These only write a byte to a pipe (non-blocking; a full pipe already holds a
    wake-up) and a thread sets the events. A stop signal after the first is ignored."""

    def __init__(self, stop: threading.Event, reload_due: threading.Event) -> None:
        self._stop, self._reload_due = stop, reload_due
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="shmfabric-signals", daemon=True)
        self._thread.start()

    def on_stop(self, signum, frame) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._poke(b"S")

    def on_hup(self, signum, frame) -> None:
        self._poke(b"H")

    def _poke(self, what: bytes) -> None:
        try:
            os.write(self._w, what)
        except OSError:  # full (a wake-up is pending) or closed (the manager is exiting)
            pass

    def _run(self) -> None:
        try:
            while True:
                try:
                    data = os.read(self._r, 512)
                except InterruptedError:
                    continue
                if not data:
                    return
                if b"S" in data:
                    self._stop.set()
                if b"H" in data:
                    self._reload_due.set()
        finally:
            os.close(self._r)

    def close(self) -> None:
        """Stop the thread (it reads the end of the pipe). Call after the handlers are restored."""
        if self._w >= 0:
            os.close(self._w)
            self._w = -1
            self._thread.join(5)


def _reload_on_hup(sup, due: threading.Event, stop: threading.Event) -> None:
    """SIGHUP: apply the config file again (the file last loaded: the one started with, unless a
    `reload FILE` named another), as `shmfabric reload` does; the outcome goes to stderr (the
    manager's log with --detach) and to the events. Signals during a reload make one more reload."""
    from shmfabric.manager.supervisor import OperationInProgress, SupervisorError

    told = False
    while not stop.is_set():
        if not due.wait(0.2):
            continue
        due.clear()
        try:
            # waits its turn behind an operation under way (a scale, a reload, the scale policy), a
            # second at a time so that a stop is not held up: the signal is queued, never lost
            changes = sup.reload_file(wait=1.0)
        except OperationInProgress as exc:
            if not told:
                print(f"shmfabric: SIGHUP: {exc.args[0].split(';')[0]}; the reload runs after it", file=sys.stderr,
                      flush=True)
                told = True
            due.set()
            continue
        except SupervisorError as exc:
            told = False
            print(f"shmfabric: SIGHUP: reload of {sup.source} failed: {sup.redact_text(str(exc))}", file=sys.stderr,
                  flush=True)
            continue
        told = False
        warnings = changes.pop("warnings", [])
        done = "; ".join(f"{k} {', '.join(v)}" for k, v in changes.items() if v) or "nothing changed"
        print(f"shmfabric: SIGHUP: reloaded {sup.source}: {done}", file=sys.stderr, flush=True)
        for w in warnings:
            print(f"shmfabric: SIGHUP: warning: {sup.redact_text(w)}", file=sys.stderr, flush=True)


class _LiveView:
    """`up --live`: the `top` view of the running topology, redrawn every second from a thread."""

    def __init__(self, sup, stop: threading.Event) -> None:
        self.sup, self.stop = sup, stop
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="shmfabric-live", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from rich.live import Live

        rates = Rates()
        st = self.sup.status()
        with Live(_top_table(st, rates.update(st, time.monotonic())), console=console(), refresh_per_second=2,
                  transient=False) as live:
            while not (self.done.wait(1.0) or self.stop.is_set()):
                st = self.sup.status()
                live.update(_top_table(st, rates.update(st, time.monotonic())))

    def close(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)


def _drained(st: dict) -> dict:
    # The summary is read after the drain and before the nodes are stopped (their counters
    # are final then): a node still up has drained its input, and says so rather than "running".
    for node in st["nodes"]:
        for i in node["instances"]:
            if i["state"] == "running":
                i["state"] = "drained"
    return st


def _print_summary(st: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(st, default=str))
        return
    from rich.table import Table

    t = Table(title=f"fabric {st['fabric']}: summary after {st['uptime']:.1f}s", title_justify="left")
    for col in ("node", "function", "in frames", "out frames", "dropped", "restarts", "state"):
        t.add_column(col, justify="right" if col not in ("node", "function", "state") else "left")
    for node in st["nodes"]:
        for i in node["instances"]:
            c = i["counters"]
            t.add_row(i["name"], i["function"], f"{c.get('in_frames', i['rx_frames']):,}",
                      f"{c.get('out_frames', i['tx_frames']):,}", f"{i['dropped']:,}", str(i["restarts"]), i["state"])
    con = console()
    con.print(t)
    for c in st["chains"]:
        con.print(f"chain {c['name']}: {c['delivered_frames']:,} frames delivered to {', '.join(c['tail'])}")
    for p in st["pools"]:
        # After the drain the rings are empty: what live nodes still hold is their per-node slot
        # caches, returned when they leave. Said outright so it is not read as a leak.
        con.print(f"network {p['network']} pool: {p['free']:,}/{p['total']:,} slots free, {p.get('held', 0):,} held by "
                  f"live nodes (their slot caches, returned as they leave), {p['orphaned']} orphaned")


# -- down / status / reload --------------------------------------------------------------------------
def _is_loopback(url: str) -> bool:
    import ipaddress
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _down_by_api(args: argparse.Namespace) -> dict:
    """`down --api URL`: stop the manager answering at URL, and only that one (no state file, no signal)."""
    url = _api_target(args)
    try:
        st = api_call(url, "/status", timeout=10)
    except CliError as exc:
        if isinstance(exc, ApiAuthError) or str(exc).startswith("cannot reach"):
            raise CliError(f"{exc}; nothing was stopped") from None
        raise CliError(f"{url} does not answer like a shmfabric manager ({exc}); nothing was stopped") from None
    if not isinstance(st, dict) or "fabric" not in st or "pid" not in st:
        raise CliError(f"{url} does not answer like a shmfabric manager; nothing was stopped")
    if getattr(args, "fabric", None) and st["fabric"] != args.fabric:
        raise CliError(f"the manager at {url} runs fabric {st['fabric']!r}, not {args.fabric!r}; nothing was stopped")
    api_call(url, "/shutdown", {}, timeout=5)
    pid = int(st["pid"])
    deadline = time.monotonic() + args.timeout
    # a manager on this host is waited for until its process is gone (its nodes stopped, its fabric
    # removed); one elsewhere until its API stops answering
    local = _is_loopback(url) and _pid_alive(pid)
    while True:
        if local:
            if not _pid_alive(pid):
                break
        else:
            try:
                # without the token: once the manager let its port go, another may listen there; a
                # 401 is an answer too (the manager is still up)
                api_call(url, "/status", timeout=2, send_token=False)
            except ApiAuthError:
                pass
            except CliError:
                break
        if time.monotonic() > deadline:
            raise CliError(f"the manager at {url} (pid {pid}) still runs after {args.timeout:g}s; look at its log")
        time.sleep(0.05)
    return st


def cmd_down(args: argparse.Namespace) -> int:
    if not args.timeout > 0:
        raise CliError(f"--timeout {args.timeout:g}: give the seconds to wait for a clean stop, a number above 0")
    t0 = time.monotonic()
    if getattr(args, "api", None):
        st = _down_by_api(args)
        api = _api_url(args)
    else:
        st = _down_by_state(args)
        api = st.get("api")
    if getattr(args, "json", False):
        # the field names of `up --detach --json` (fabric, pid, api), plus what down did
        print(json.dumps({"fabric": st["fabric"], "pid": int(st["pid"]), "api": api, "stopped": True,
                          "seconds": round(time.monotonic() - t0, 3)}))
    else:
        print(f"fabric {st['fabric']} down")
    return 0


def _down_by_state(args: argparse.Namespace) -> dict:
    st = _find_state(args)
    pid = int(st["pid"])
    try:
        if st.get("api"):
            # (a token file that cannot be read, like an API that does not answer: the signal below)
            api_call(_api_target(args), "/shutdown", {}, timeout=5)
        elif _manager_alive(st):
            os.kill(pid, signal.SIGTERM)
    except CliError:
        if _manager_alive(st):  # checked again: only the manager is ever sent a signal
            os.kill(pid, signal.SIGTERM)  # the API is wedged: the signal handler stops just the same
    deadline = time.monotonic() + args.timeout
    while _manager_alive(st):
        if time.monotonic() > deadline:
            raise CliError(f"manager pid {pid} still runs after {args.timeout:g}s; look at its log, "
                           f"or kill it (its nodes are reclaimed by the fabric)")
        time.sleep(0.05)
    return st


def _dropped(inst: dict) -> int:
    return int(inst.get("dropped", 0))


def cmd_status(args: argparse.Namespace) -> int:
    st = api_call(_api_target(args), "/status", timeout=10)
    if getattr(args, "json", False):
        print(json.dumps(st, indent=1, default=str))
        return 0
    from rich.table import Table

    t = Table(title=f"fabric {st['fabric']} (manager pid {st['pid']}, up {st['uptime']:.0f}s)", title_justify="left")
    for col in ("instance", "function", "version", "pid", "state", "in frames", "out frames", "dropped", "queue",
                "restarts", "function counters"):
        t.add_column(col, justify="right" if col in ("pid", "in frames", "out frames", "dropped", "queue",
                                                     "restarts") else "left", overflow="fold")
    for node in st["nodes"]:
        for i in node["instances"]:
            c = i["counters"]
            fc = ", ".join(f"{k}={v}" for k, v in sorted(i.get("function_counters", {}).items())[:6])
            t.add_row(i["name"], i["function"], str(i.get("version") or "-"), str(i["pid"] or "-"), i["state"],
                      f"{c.get('in_frames', i['rx_frames']):,}", f"{c.get('out_frames', i['tx_frames']):,}",
                      f"{_dropped(i):,}", str(i["queue_depth"]), str(i["restarts"]), fc)
    con = console()
    con.print(t)
    for c in st["chains"]:
        con.print(f"chain {c['name']}: {' -> '.join(x if isinstance(x, str) else '|'.join(x) for x in c['nodes'])}; "
                  f"{c['delivered_frames']:,} frames delivered")
    for p in st["pools"]:
        con.print(f"network {p['network']} (MTU {p['mtu']}): {p['free']:,}/{p['total']:,} slots free, "
                  f"{p['orphaned']} orphaned")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    body = {"path": str(Path(args.config).resolve())} if args.config else {}
    url = _api_target(args)
    if args.config:
        # the manager checks the file (one parse); a refusal is checked again here so that a config
        # error names this shell's path, as `up` would
        try:
            res = api_call(url, "/reload", body, timeout=120)
        except CliError:
            _load(args.config)
            raise
    else:
        res = api_call(url, "/reload", body, timeout=120)
    changes = {k: v for k, v in res.get("changes", {}).items() if v}
    warnings = changes.pop("warnings", [])
    if getattr(args, "json", False):
        print(json.dumps(res))
        return 0
    if not changes:
        print("reloaded: nothing changed")
    else:
        print("reloaded: " + "; ".join(f"{k} {', '.join(v)}" for k, v in changes.items()))
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 0


# -- top -------------------------------------------------------------------------------------------
class Rates:
    """Per-second rates from successive status snapshots (pure; `now` is an input).

    The manager reads counters at its own polls (`poll_interval`), not when asked: a rate is a
    counter's change between two of the manager's samples divided by the time between those samples
    (`sampled_at` for the node table's counters, each instance's `counters_at` for its runtime
    counters, `clock` for CPU time, which is read when status is built). Dividing by the caller's
    clock instead was off by up to a poll interval either way. A snapshot holding the same sample
    as the one before shows the last rate again. `now` is the fallback for a manager whose status
    carries no sample times."""

    def __init__(self) -> None:
        self._base: dict[tuple, tuple[float, float, float | None]] = {}  # key -> (value, time, last rate)

    def _rate(self, key: tuple, value: float | None, t: float | None, seen: dict) -> float | None:
        if value is None or t is None:
            return None
        b = self._base.get(key)
        if b is None or t < b[1]:
            r = None  # a first sample (or a clock that went back: another manager)
        elif t == b[1]:
            seen[key] = b  # the same sample again: the rate computed from it still holds
            return b[2]
        else:
            r = max(0.0, (value - b[0]) / (t - b[1]))
        seen[key] = (value, t, r)
        return r

    def update(self, st: dict, now: float) -> dict:
        """Rows of the live view: per instance rates, CPU %, and per chain delivered frames/s."""
        seen: dict[tuple, tuple[float, float, float | None]] = {}
        table_t = st.get("sampled_at")
        table_t = now if table_t is None else table_t
        clock_t = st.get("clock")
        clock_t = now if clock_t is None else clock_t
        rows = []
        for node in st["nodes"]:
            for i in node["instances"]:
                c = i["counters"]
                who = (i["name"], i["pid"])
                counters_t = i.get("counters_at")
                counters_t = table_t if counters_t is None else counters_t

                def rate(key: str, fallback: str) -> float | None:
                    # the runtime's counter when it reports one (polled at counters_at), else the
                    # node table's (polled at sampled_at)
                    if key in c:
                        return self._rate(who + ("c", key), c[key], counters_t, seen)
                    return self._rate(who + ("t", fallback), i.get(fallback, 0), table_t, seen)

                cpu = self._rate(who + ("cpu",), i.get("cpu_seconds"), clock_t, seen)
                rx_bps = self._rate(who + ("t", "rx_bytes"), i["rx_bytes"], table_t, seen)
                tx_bps = self._rate(who + ("t", "tx_bytes"), i["tx_bytes"], table_t, seen)
                rows.append({"name": i["name"], "function": i["function"], "state": i["state"], "pid": i["pid"],
                             "fps": rate("in_frames", "rx_frames"),
                             # a source receives nothing: show what it sends
                             "bps": rx_bps if i["rx_frames"] else tx_bps,
                             "out_fps": rate("out_frames", "tx_frames"),
                             "dropped": _dropped(i), "queue": i["queue_depth"],
                             "cpu": None if cpu is None else 100.0 * cpu, "restarts": i["restarts"]})
        chains = []
        for c in st["chains"]:
            chains.append({"name": c["name"], "delivered": c["delivered_frames"],
                           "fps": self._rate(("chain", c["name"]), c["delivered_frames"], table_t, seen)})
        self._base = seen  # instances gone (restarted, scaled in) are forgotten
        return {"rows": rows, "chains": chains}


def _fmt_rate(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:.1f}{suf}{unit}"
    return f"{v:.0f}{unit}"


def _top_table(st: dict, view: dict):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    t = Table(title=f"shmfabric top: fabric {st['fabric']}  (q to quit: Ctrl-C)", title_justify="left", expand=False)
    for col in ("instance", "function", "state", "pid", "frames/s", "bytes/s", "out/s", "dropped", "queue", "CPU %",
                "restarts"):
        t.add_column(col, justify="left" if col in ("instance", "function", "state") else "right")
    styles = {"running": "green", "starting": "yellow", "backoff": "yellow", "stopping": "yellow", "failed": "red"}
    for r in view["rows"]:
        t.add_row(r["name"], r["function"], Text(r["state"], style=styles.get(r["state"], "")), str(r["pid"] or "-"),
                  _fmt_rate(r["fps"]), _fmt_rate(r["bps"], "B"), _fmt_rate(r["out_fps"]), f"{r['dropped']:,}",
                  str(r["queue"]), "-" if r["cpu"] is None else f"{r['cpu']:.0f}", str(r["restarts"]))
    lines = [t]
    for c in view["chains"]:
        lines.append(Text(f"chain {c['name']}: {_fmt_rate(c['fps'])} frames/s end to end "
                          f"({c['delivered']:,} delivered)"))
    for p in st["pools"]:
        lines.append(Text(f"network {p['network']}: {p['free']:,}/{p['total']:,} slots free"))
    return Group(*lines)


def cmd_top(args: argparse.Namespace) -> int:
    from rich.live import Live

    if not 0 < args.interval <= 3600:
        raise CliError(f"--interval {args.interval:g}: give the seconds between samples, above 0 and at most 3600")
    url = _api_target(args)
    rates = Rates()
    st = api_call(url, "/status", timeout=10)
    view = rates.update(st, time.monotonic())
    if args.once:  # two samples one interval apart, printed once (scripts, tests)
        first = st.get("sampled_at")
        time.sleep(args.interval)
        st = api_call(url, "/status", timeout=10)
        # an interval shorter than the manager's poll may find the same sample: wait for the next
        # poll (bounded: a manager that stopped polling gets "-" for its rates)
        deadline = time.monotonic() + 2 * float(st.get("poll_interval") or 1.0) + 1.0
        while first is not None and st.get("sampled_at") == first and time.monotonic() < deadline:
            time.sleep(0.05)
            st = api_call(url, "/status", timeout=10)
        console().print(_top_table(st, rates.update(st, time.monotonic())))
        return 0
    try:
        with Live(_top_table(st, view), refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(args.interval)
                try:
                    st = api_call(url, "/status", timeout=10)
                except CliError:
                    live.stop()
                    if not live.console.is_terminal:
                        print()  # rich ends the view with a newline only on a terminal
                    print("the manager is gone")
                    return 0
                live.update(_top_table(st, rates.update(st, time.monotonic())))
    except KeyboardInterrupt:
        return 0


# -- parsers ---------------------------------------------------------------------------------------
def _target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fabric", help="the manager of this fabric (when several run)")
    p.add_argument("--api", help="management API URL (instead of finding the manager's state file); the token "
                   "is sent to whatever listens there, unchecked (through a state file, only to the manager's own "
                   "socket)")
    p.add_argument("--api-token-file", metavar="PATH",
                   help=f"the file holding the API's bearer token (default: with --api, ${TOKEN_FILE_ENV}; "
                        "else the one the manager's state file names)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="run a topology: create the fabric and start, watch and steer every node",
                       description="Run a topology file (default: the built-in examples/edge.yaml) in the "
                                   "foreground until Ctrl-C, for --duration seconds, or in the background.")
    p.add_argument("config", nargs="?", help="topology YAML (default: examples/edge.yaml)")
    p.add_argument("--detach", "-d", action="store_true", help="run in the background; `shmfabric down` stops it")
    p.add_argument("--duration", type=float, help="stop after this many seconds and print a summary")
    p.add_argument("--live", action="store_true", help="show the live `top` view while running in the foreground")
    p.add_argument("--api", help="override the config's management API address HOST:PORT")
    p.add_argument("--fabric", help="override the config's fabric name (run a second copy of a topology)")
    p.add_argument("--quiet", action="store_true", help="no banner or summary (used by --detach)")
    p.add_argument("--start-timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    add_json_flag(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop a running manager and everything it runs")
    _target(p)
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for a clean stop (default: %(default)g)")
    add_json_flag(p)
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="every node of a running manager: function, pid, state, counters")
    _target(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("top", help="live view: per node frames/s, bytes/s, drops, queue depth, CPU, state")
    _target(p)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    p.add_argument("--once", action="store_true", help="print one view (two samples) and exit")
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("reload", help="apply the (edited) config file to a running manager")
    p.add_argument("config", nargs="?", help="the new file (default: the file last loaded: the one the manager "
                   "started with, or the last one given to reload)")
    _target(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_reload)
