"""The code sandbox's supervisor: `python -I sandbox_runner.py`, a marshal-ed config on stdin, one verdict line
("<bits or -> <reason or ->") on stdout. Started by rewards.run_sandboxed in a cleared environment and its own
session; never imported by the trainer, and it imports nothing slow (it starts once per code completion).

  supervisor (child subreaper) --fork--> child, in new pid + network namespaces (as root; without root inside a new
     user namespace where the kernel allows it): own session, rlimits (CPU, address space, file size, open files,
     core), own temp dir, stdin /dev/null, stdout+stderr to a capped file, as root a fresh uid per run with
     no_new_privs; then Python guards; exec(code); exec(each test); "<nonce> <bits> <error>" to the result pipe.
When the child exits or the wall clock runs out, the supervisor kills it. As the pid namespace's init, its death
makes the kernel kill everything left inside; without namespaces the supervisor kills the child's group, every
process of the run's uid (kill(-1) as that uid) and everything reparented to it (setsid()-ed grandchildren
included), until it has no children left. Only the nonce line proves that the tests ran to the end: sys.exit,
os._exit and printed markers cannot forge it.
Limits: the tests run in the model's own interpreter, so code that searches its own memory (frames, gc) for the
nonce, or returns objects whose __eq__ is always true, is not stopped. The fresh uid keeps CAP_DAC_READ_SEARCH (to
read the interpreter wherever it is installed), so it can read files but not write, delete or signal anything
outside its directory; it has no network to send them to. Without root, the uid, RLIMIT_NPROC and file-ownership
walls are missing: only the namespaces (if the kernel allows them) and the Python guards remain.
"""
import ctypes
import marshal
import os
import resource
import select
import signal
import sys
import time

PR_SET_KEEPCAPS, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, CAP_DAC_READ_SEARCH = 8, 36, 38, 2
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
OUTPUT_CAP = 16 << 20  # bytes of stdout+stderr (and of any one file the code writes)
UID_BASE = 1_000_000  # as root, a run's code gets uid UID_BASE + supervisor pid: unique while the run lives
ERRORS = {"-": "-", "SystemExit": "exit_before_tests", "MemoryError": "memory", "SyntaxError": "syntax_error"}


def _supervise():
    cfg = marshal.loads(sys.stdin.buffer.read())
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of the subtree, setsid()-ed or not, come back to us
    uid = UID_BASE + os.getpid() if os.geteuid() == 0 else None
    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"nano_r1_sandbox_{os.getpid()}_{os.urandom(6).hex()}")
    os.mkdir(tmp, 0o700)
    if uid is not None:
        os.chown(tmp, uid, uid)
    # The child will be the new pid namespace's init: kill(-1) from inside reaches only the namespace, and when it
    # dies the kernel kills everything left in it. The new network namespace has no interfaces but loopback (down).
    own_ns = libc.unshare(CLONE_NEWPID | CLONE_NEWNET | (CLONE_NEWUSER if uid is None else 0)) == 0
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(cfg, tmp, uid, w, libc, own_ns)  # never returns
    os.close(w)
    status = _wait(pid, cfg["timeout"])
    _kill_all(pid, None if own_ns else uid)  # (no forks into a dead pid namespace: it is empty anyway)
    os.set_blocking(r, False)  # every writer is dead now; never block on the pipe anyway
    data = b""
    try:
        while len(data) < 1 << 20 and (chunk := os.read(r, 1 << 16)):
            data += chunk
    except BlockingIOError:
        pass
    try:
        capped = os.path.getsize(os.path.join(tmp, "output.txt")) >= OUTPUT_CAP
    except OSError:
        capped = False
    _rmtree(tmp)
    bits = err = None
    for line in data.decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == cfg["nonce"]:
            bits, err = parts[1], parts[2]
    sig = os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None
    if capped:
        reason = "output_limit"
    elif bits is not None:
        reason = ERRORS.get(err, "exception")
    elif status is None or sig in (signal.SIGXCPU, signal.SIGKILL):
        reason = "timeout"  # wall clock, or RLIMIT_CPU
    else:
        reason = "no_proof"  # exited (os._exit, a crash) before the harness wrote the nonce line
    print(bits or "-", reason, flush=True)
    os._exit(0)  # skip interpreter teardown: it is on every code reward's critical path


def _wait(pid, timeout):
    """Exit status of our child pid, or None if it still runs after timeout seconds."""
    try:
        fd = os.pidfd_open(pid)  # Linux >= 5.3: sleep until the child exits or the time is up
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        ready = select.select([fd], [], [], timeout)[0]
        os.close(fd)
        return os.waitpid(pid, 0)[1] if ready else None
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.005)
    return None


def _children():
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:  # no CONFIG_PROC_CHILDREN: scan /proc for our children
        kids = []
        for d in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{d}/stat") as f:
                    kids += [int(d)] if int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid() else []
            except (OSError, ValueError, IndexError):
                pass
        return kids


def _kill_all(pid, uid):
    """Kill the child's group, everything of the sandbox uid (if given), and everything reparented to us; reap
    until we have no children left (bounded: a process stuck in the kernel cannot hold the supervisor forever)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    end = time.monotonic() + 5
    while time.monotonic() < end:
        if uid is not None:
            helper = os.fork()
            if helper == 0:  # kill(-1) as the sandbox uid reaches exactly its processes, forks included
                try:
                    os.setresuid(uid, uid, uid)
                    os.kill(-1, signal.SIGKILL)
                finally:
                    os._exit(0)
            os.waitpid(helper, 0)
        for kid in _children():
            try:
                os.kill(kid, signal.SIGKILL)
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            return
        time.sleep(0.001)


def _rmtree(path):
    """Remove the sandbox directory (everything that could write to it is dead; symlinks are unlinked, not followed)."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files + dirs:
            p = os.path.join(root, name)
            try:
                os.rmdir(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass


def _child(cfg, tmp, uid, w, libc, own_ns):
    """The sandboxed process: limits, identity, guards, then the code and the tests. Never returns."""
    try:
        os.setsid()
        os.chdir(tmp)
        out = os.open("output.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.dup2(w, 3)  # the result pipe; every other descriptor (the supervisor's pipes too) is closed
        os.closerange(4, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        limits = [(resource.RLIMIT_CPU, int(cfg["timeout"]) + 1), (resource.RLIMIT_AS, cfg["memory_mb"] << 20),
                  (resource.RLIMIT_FSIZE, OUTPUT_CAP), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)]
        if uid is not None:  # RLIMIT_NPROC does not bind root; it binds the fresh uid
            limits.append((resource.RLIMIT_NPROC, 64))
        for res, lim in limits:
            resource.setrlimit(res, (lim, lim))
        if uid is not None:
            libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            # Keep one capability, CAP_DAC_READ_SEARCH, so the fresh uid can read the interpreter and its libraries
            # wherever they live (/root/.pyenv is 0700). Writes, deletes and signals are still checked against its
            # own uid, and other processes' /proc/<pid>/environ|mem need ptrace rights it does not have.
            header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
            data = (ctypes.c_uint32 * 6)(1 << CAP_DAC_READ_SEARCH, 1 << CAP_DAC_READ_SEARCH, 0, 0, 0, 0)
            if libc.capset(header, data) != 0:
                raise OSError(ctypes.get_errno(), "capset")
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # setuid binaries cannot hand root back
        os.environ.update(HOME=tmp, TMPDIR=tmp)
        _guard(os.path.realpath(tmp), sockets=not own_ns)
        _run_tests(cfg)
    finally:
        os._exit(0)


_REFUSED = ("kill killpg fork forkpty system popen execv execve execl execle execlp execlpe execvp execvpe spawnv "
            "spawnve spawnl spawnle spawnlp spawnlpe spawnvp spawnvpe posix_spawn posix_spawnp remove unlink rmdir "
            "removedirs rename renames replace truncate chmod fchmod lchmod chown fchown lchown link symlink chroot")


def _guard(tmp, sockets):
    """Refuse destructive file and process calls (and sockets, when there is no network namespace) at the Python
    level: a first wall that ctypes gets past (the OS-level walls do not care). shutil and subprocess go through
    the refused calls. Writes are allowed inside the sandbox directory only."""
    import _posixsubprocess
    import builtins
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


def _run_tests(cfg):
    import builtins
    run, build, write, nonce = exec, compile, os.write, cfg.pop("nonce")  # bound before the model can patch them
    pristine = dict(builtins.__dict__)  # the tests get builtins that the model's code could not have changed
    g = {"__name__": "__main__", "__builtins__": dict(pristine)}
    err = "-"
    try:
        run(build(cfg["code"], "<completion>", "exec"), g)
    except BaseException as e:  # SystemExit too: sys.exit(0) before the tests is a failure, not a pass
        err = type(e).__name__
    tg, bits = dict(g, __builtins__=pristine), ""
    for src in cfg["units"]:
        ok = err == "-"
        if ok:
            try:
                run(build(src, "<test>", "exec"), tg)
            except BaseException:
                ok = False
        bits += "1" if ok else "0"
    write(3, f"{nonce} {bits} {err}\n".encode())  # the proof: only here, after the last test


if __name__ == "__main__":
    _supervise()
