"""The walls of the code sandbox: the model's process (sandbox_runner.py's docstring says what runs where, and why).
After the supervisor forks, _child puts up the limits, the identity, the read-only world (userns) and the Python
guards, runs the model's code, then serves the judge's calls with plain data only (_serve). Imported by
sandbox_runner before the fork; it imports nothing of the project.
"""
import builtins
import ctypes
import fcntl
import marshal
import os
import resource
import signal

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_KEEPCAPS, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 8, 36, 38
CAP_DAC_READ_SEARCH = 2
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
MS_REC, MS_PRIVATE = 1 << 14, 1 << 18
OUTPUT_CAP = 16 << 20  # bytes of stdout+stderr (and of any one file the code writes)
ATOMS = {type(None), bool, int, float, complex, str, bytes}


def _child(cfg, tmp, uid, isolation, reply_w, call_r, libc):
    """The sandboxed process: limits, identity, guards, then the code, then it serves calls. Never returns. If a
    wall cannot be put up, it says so to the judge (sandbox_error) instead of running the code."""
    reply = reply_w
    try:
        os.setsid()
        reply, calls = fcntl.fcntl(reply_w, fcntl.F_DUPFD, 10), fcntl.fcntl(call_r, fcntl.F_DUPFD, 10)
        if isolation == "userns":
            _read_only_world(libc, os.path.realpath(tmp))
        os.chdir(tmp)
        out = os.open("output.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.dup2(reply, 3)  # replies to the judge
        os.dup2(calls, 4)  # calls from the judge; every other descriptor (the supervisor's stdio too) is closed
        os.closerange(5, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        limits = [(resource.RLIMIT_CPU, int(cfg["timeout"]) + 1), (resource.RLIMIT_AS, cfg["memory_mb"] << 20),
                  (resource.RLIMIT_FSIZE, OUTPUT_CAP), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)]
        if uid is not None:  # RLIMIT_NPROC does not bind root; it binds the fresh uid
            limits.append((resource.RLIMIT_NPROC, 64))
        for res, lim in limits:
            resource.setrlimit(res, (lim, lim))
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        if uid is not None:
            libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            # Keep one capability, CAP_DAC_READ_SEARCH, so the fresh uid can read the interpreter and its libraries
            # wherever they live (/root/.pyenv is 0700). Writes, deletes and signals are still checked against its
            # own uid, and other processes' /proc/<pid>/environ|mem need ptrace rights it does not have.
            data = (ctypes.c_uint32 * 6)(1 << CAP_DAC_READ_SEARCH, 1 << CAP_DAC_READ_SEARCH, 0, 0, 0, 0)
            if libc.capset(header, data) != 0:
                raise OSError(ctypes.get_errno(), "capset")
        elif isolation == "userns":  # no capability in the user namespace either: mounts stay as they are
            if libc.capset(header, (ctypes.c_uint32 * 6)()) != 0:
                raise OSError(ctypes.get_errno(), "capset")
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # setuid binaries cannot hand root back
        # if the supervisor itself dies (killed by run_sandboxed), so do we (set after setresuid, which clears it)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        os.environ.update(HOME=tmp, TMPDIR=tmp)
        _guard(os.path.realpath(tmp), sockets=isolation in ("uid", "none"))
    except BaseException as e:
        _write_message(reply, ("setup_error", f"{type(e).__name__}: {e}"[:500]))
        os._exit(0)
    try:
        _serve(cfg)
    finally:
        os._exit(0)


def _read_only_world(libc, keep):
    """Without root (user namespace): a mount namespace of our own where every mount is read-only except the
    sandbox directory, so code running as the trainer's uid cannot write the trainer's files. Refuses (raises) if
    any reachable mount stays writable."""
    def mount(src, target, flags):
        if libc.mount(src, target, None, flags, None) != 0:
            raise OSError(ctypes.get_errno(), f"mount {target!r}")

    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    mount(None, b"/", MS_REC | MS_PRIVATE)  # nothing we do here reaches the trainer's mounts
    keep = os.fsencode(keep)
    mount(keep, keep, MS_BIND)  # the sandbox directory becomes a mount of its own, left writable
    with open("/proc/self/mountinfo", "rb") as f:
        mounts = [line.split()[4:6] for line in f]
    points = set()
    for point, opts in mounts:
        for esc, char in ((b"\\040", b" "), (b"\\011", b"\t"), (b"\\012", b"\n"), (b"\\134", b"\\")):
            point = point.replace(esc, char)
        if point != keep:
            points.add(point)
            # flags the kernel locked on this mount must be repeated, or the remount is refused
            opts = opts.split(b",")
            flags = sum(v for k, v in ((b"nosuid", MS_NOSUID), (b"nodev", MS_NODEV), (b"noexec", MS_NOEXEC))
                        if k in opts)
            libc.mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags, None)  # checked below
    for point in points:  # what a path reaches is the top mount: that is the one that must be read-only
        try:
            writable = not os.statvfs(point).f_flag & os.ST_RDONLY
        except OSError:
            continue  # unreachable for us, hence for the code too
        if writable:
            raise OSError(f"{point!r} is still writable")


_REFUSED = ("kill killpg fork forkpty system popen execv execve execl execle execlp execlpe execvp execvpe spawnv "
            "spawnve spawnl spawnle spawnlp spawnlpe spawnvp spawnvpe posix_spawn posix_spawnp remove unlink rmdir "
            "removedirs rename renames replace truncate chmod fchmod lchmod chown fchown lchown link symlink chroot")


def _guard(tmp, sockets):
    """Refuse destructive file and process calls (and sockets, when there is no network namespace) at the Python
    level: a first wall that ctypes gets past (the OS-level walls do not care). shutil and subprocess go through
    the refused calls. Writes are allowed inside the sandbox directory only."""
    import _posixsubprocess
    import io
    import posix
    socket = __import__("socket") if sockets else None  # importing it costs a few ms per run

    def refuse(*args, **kwargs):
        raise PermissionError("disabled in the nano-r1 sandbox")

    for mod, names in ((os, _REFUSED.split()), (posix, _REFUSED.split()), (_posixsubprocess, ["fork_exec"]),
                       (socket, ["socket", "create_connection", "socketpair", "fromfd"])):
        for name in names:
            if hasattr(mod, name):
                setattr(mod, name, refuse)
    real_open, real_os_open = builtins.open, posix.open

    def inside(path):
        return isinstance(path, int) or os.fsdecode(os.path.realpath(path)).startswith(tmp + os.sep)

    def safe_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not inside(file):
            refuse()
        return real_open(file, mode, *args, **kwargs)

    def safe_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) and not inside(path):
            refuse()
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = safe_open
    os.open = posix.open = safe_os_open


def _to_plain(x):
    """x as plain data, for the judge: subclasses become their base type (a lying __eq__ stays behind), numpy
    values their .tolist(); anything else raises. Runs in the model's process, so it is a convenience for honest
    code, not a wall: the judge checks whatever arrives."""
    t = type(x)
    if t in ATOMS:
        return x
    for base in (bool, int, float, complex, str, bytes):
        if isinstance(x, base):
            return base(x)
    if isinstance(x, dict):
        return {_to_plain(k): _to_plain(v) for k, v in x.items()}
    for base in (tuple, list, set, frozenset):
        if isinstance(x, base):
            return base(_to_plain(v) for v in x)
    if callable(getattr(x, "tolist", None)):
        return _to_plain(x.tolist())
    raise ValueError(t.__name__)


def _write_message(fd, msg, write=os.write, dumps=marshal.dumps):
    data = dumps(msg, 2)  # format version 2: no back-references (see _check_marshal)
    data = len(data).to_bytes(4, "little") + data
    while data:
        data = data[write(fd, data):]


def _serve(cfg):
    """Run the model's code, report the names the tests want, then answer calls until killed."""
    run, build, read, send_to, loads = exec, compile, os.read, _write_message, marshal.loads

    def send(msg):
        send_to(3, msg)

    def receive(n):
        data = b""
        while len(data) < n:
            chunk = read(4, n - len(data))
            if not chunk:
                raise SystemExit  # the judge is done
            data += chunk
        return data

    g = {"__name__": "__main__"}
    try:
        run(build(cfg["code"], "<completion>", "exec"), g)
    except BaseException as e:  # SystemExit too: sys.exit(0) before the tests is a failure, not a pass
        send(("error", type(e).__name__))
        return
    names = {}
    for name in cfg["names"]:
        if name in g:
            if callable(g[name]):
                names[name] = ("call",)
            else:
                try:
                    names[name] = ("value", _to_plain(g[name]))
                except Exception:
                    pass  # a module, an object: the tests do not get it
    send(("ready", names))
    while True:
        name, args, kwargs = loads(receive(int.from_bytes(receive(4), "little")))
        try:
            result = g[name](*args, **kwargs)
        except BaseException as e:
            send(("raise", type(e).__name__))
            continue
        try:
            send(("ok", _to_plain(result)))
        except Exception:
            send(("bad", type(result).__name__))
