"""The code sandbox: `python -I -c "import sandbox_runner; sandbox_runner._supervise()"` (rewards.RUNNER; a module's
bytecode is cached, a script's is compiled at every start), two marshal-ed messages on stdin (what the model's
process may know, then the tests), one verdict line ("<bits or -> <reason or -> <isolation>") on stdout. Started by
rewards.run_sandboxed in a cleared environment and its own session; never imported by the trainer, and it imports
nothing slow (it starts once per code completion).

Two processes, and only one of them runs the model's code:

  supervisor = judge (child subreaper, not dumpable) --fork--> model process: in new pid + network namespaces (as
     root; without root inside a new user namespace, where it also gets a mount namespace in which every mount is
     read-only but its own directory, and no capabilities), own session, rlimits (CPU, address space, file size,
     open files, core), own temp dir, stdin /dev/null, stdout+stderr to a capped file, as root a fresh uid per run
     with no_new_privs; then Python guards; exec(code); then it answers calls: (name, args, kwargs) in, result out.
  The supervisor reads the tests only after the fork, so the model's process never holds them, and runs them one
  unit at a time in its own interpreter. A name the tests use that the code defined is a proxy there: anything
  callable becomes a stub that sends (name, args, kwargs) down a pipe and returns the reply; a plain-data global
  is copied once. Only plain data crosses: None, bool, int, float, complex, str, bytes, and tuple, list, dict, set,
  frozenset of them, as marshal format version 2 (no back-references). The judge checks each reply's bytes before
  loading them (_check_marshal: plain-data type codes only, so no code objects; lengths within the message;
  bounded nesting; marshal.loads itself crashes on hostile back-references), reads replies with a size cap
  (REPLY_CAP) and within the run's wall clock. So the tests never compare an object of the model's class: an
  always-equal __eq__ never reaches them. The model's side sends subclasses of int/str/list/... as their base type
  (their lying methods stay behind) and numpy values as their .tolist(); it is a convenience for honest code, not a
  wall: whatever arrives is checked. The verdict is what the supervisor computed, written to its own stdout, for
  which the model's process has no descriptor: there is no proof to forge, so there is no nonce.

When the tests are done, the model's process hangs or the wall clock runs out, the supervisor kills it. As the pid
namespace's init, its death makes the kernel kill everything left inside; without namespaces the supervisor kills
the child's group, every process of the run's uid (kill(-1) as that uid) and everything reparented to it
(setsid()-ed grandchildren included), until it has no children left. If the supervisor itself dies, the child gets
SIGKILL (PR_SET_PDEATHSIG). A model that hangs, floods or dies fails the current test and all later ones
(reasons timeout, bad_reply, died; output_limit when its stdout+stderr reach OUTPUT_CAP): a test's own
`except BaseException` cannot turn that into a pass. The wall clock interrupts the tests themselves only between
Python bytecodes (SIGALRM); trusted tests stuck in C code are killed by run_sandboxed's own timeout.

Semantics of the proxies (what a test sees differs from running the code in one interpreter):
- Arguments are copies: a test that relies on the function mutating its argument in place sees no mutation.
  Plain-data globals are a snapshot taken after the code ran: calls that change them later are not seen.
- Only plain data crosses, both ways: a test that passes a lambda, a generator or an object of its own class
  fails (reason bad_args); so does a call whose result is not plain data (reason not_plain), e.g. an instance of
  the model's class (classes with methods, LeetCode-style `Solution().f()`, cannot be tested this way).
- Exceptions cross as their type name: a builtin exception type is raised again in the judge (so try/except and
  pytest.raises-style tests still see ValueError, IndexError, ...); any other name (the model's own exception
  classes, SystemExit, KeyboardInterrupt) is raised as ModelRaised, an Exception. Best effort: the message and the
  traceback stay behind.
- Only names the tests mention are looked up; builtin names always mean the builtin (a model's `len` cannot stand
  in for the tests' `len`), and modules the code imported are not handed over: tests import what they use.
- Each call is a round trip (about 10 microseconds on an idle core), and replies are checked in Python (about a
  tenth of a second per million values): tests making millions of calls, or comparing huge results, are slower.
- Ints beyond 32 bits and strs cross exactly; a reply over REPLY_CAP bytes or nested deeper than MAX_DEPTH is a
  bad_reply. All 164 HumanEval canonical solutions score 1.0 as before.

Isolation, reported with every verdict: "uid+ns" (root, namespaces), "uid" (root, the kernel refused namespaces),
"userns" (no root: namespaces inside a user namespace), "none" (neither root nor a user namespace). Under
isolation="strict" (the default) the supervisor refuses "none" and says what is missing and how to accept weaker
isolation; "weak" accepts it knowingly. Test-only: cfg["pretend"] (from the environment variable
NANO_R1_SANDBOX_PRETEND, which tests set) makes it act as if it were not root ("no_root": as root, the "userns"
path) or as if the kernel also refused user namespaces ("no_isolation": refused under strict).
Limits: the fresh uid keeps CAP_DAC_READ_SEARCH (to read the interpreter wherever it is installed), so it can read
files but not write, delete or signal anything outside its directory; with namespaces it has no network to send
them to ("uid": the network is walled by the Python guards only, which _socket and ctypes get past). Under
"userns" the code runs as the trainer's own uid outside the namespace: read-only mounts keep it from writing any
file outside its directory, the pid and user namespaces from signalling or ptracing the trainer; but it can read
what the trainer can read and connect to unix sockets the trainer's uid may use (e.g. a session bus), and
RLIMIT_NPROC is not set (it would count the trainer's processes): a fork bomb lasts until the wall clock. Under
"none" it runs as the trainer's uid behind the Python guards only: it can overwrite the trainer's files, kill its
processes, and even forge a verdict by writing into the trainer's end of the supervisor's stdout pipe (through
/proc, same uid); only the judge's own memory stays out of reach (not dumpable). The supervisor runs the tests with
its own privileges (root, as root): they are trusted dataset code.
"""
import builtins
import ctypes
import marshal
import os
import select
import signal
import time

from sandbox_walls import (ATOMS, CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWUSER, OUTPUT_CAP, PR_SET_CHILD_SUBREAPER,
                           PR_SET_DUMPABLE, _child, _write_message)

REPLY_CAP = 16 << 20  # bytes of one message from the model's process
MAX_ITEMS = 1 << 22  # values in one argument list, counting shared sub-containers each time they appear
MAX_DEPTH = 100  # nesting of containers in one reply
UID_BASE = 1_000_000  # as root, a run's code gets uid UID_BASE + supervisor pid: unique while the run lives
ERRORS = {"SystemExit": "exit_before_tests", "MemoryError": "memory", "SyntaxError": "syntax_error"}
SCALARS = {ord("N"): 0, ord("T"): 0, ord("F"): 0, ord("i"): 4, ord("g"): 8, ord("y"): 16}  # code: payload bytes
CONTAINERS = {tuple, list, dict, set, frozenset}


class ModelRaised(Exception):
    """The model's function raised an exception that is not a builtin type; its type name is the message."""


class _Stop(BaseException):
    """The model's process is gone, hung or speaking nonsense: the current test and all later ones fail. A
    BaseException, so that a test's `except Exception` cannot swallow it."""


def _supervise():
    verdict = os.dup(1)  # the verdict's descriptor; fd 1 becomes /dev/null, so a printing test cannot garble it
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    cfg = _read_message(0)  # what the model's process may know; the tests come later
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of the subtree, setsid()-ed or not, come back to us
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # no process of our uid (the model's, without root) may ptrace us
    isolation, why = _isolate(libc, cfg.get("pretend"))
    if isolation == "none" and cfg["isolation"] != "weak":
        os.write(verdict, f"- refused none\n{_refusal(why, cfg.get('pretend'))}\n".encode())
        os._exit(0)
    uid = UID_BASE + os.getpid() if isolation.startswith("uid") else None
    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"nano_r1_sandbox_{os.getpid()}_{os.urandom(6).hex()}")
    os.mkdir(tmp, 0o700)
    if uid is not None:
        os.chown(tmp, uid, uid)
    reply_r, reply_w = os.pipe()
    call_r, call_w = os.pipe()
    deadline = time.monotonic() + cfg["timeout"]
    pid = os.fork()
    if pid == 0:
        os.close(reply_r)
        os.close(call_w)
        _child(cfg, tmp, uid, isolation, reply_w, call_r, libc)  # never returns
    os.close(reply_w)
    os.close(call_r)
    units = _read_message(0)  # the tests: read only now, so that the model's process never held them
    link = {"pid": pid, "in": reply_r, "out": call_w, "deadline": deadline, "ready": False, "stop": None,
            "taint": None, "reason": None, "status": None}
    try:
        bits, reason = _judge(units, set(cfg["names"]), link)
    except _Stop:  # the alarm went off just as the judge was leaving: it is the deadline all the same
        bits, reason = "0" * len(units), "timeout"
    message = link.get("message", "")
    try:
        capped = os.path.getsize(os.path.join(tmp, "output.txt")) >= OUTPUT_CAP
    except OSError:
        capped = False
    if link["status"] is None:  # still running (serving calls): kill it and sleep until it is gone, then sweep
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except OSError:
                pass
        _wait(pid, 5)
    _kill_all(pid, uid if isolation == "uid" else None)  # (no forks into a dead pid namespace: it is empty anyway)
    _rmtree(tmp)
    reason = "output_limit" if capped else reason
    os.write(verdict, f"{bits or '-'} {reason or '-'} {isolation}\n{message}\n".encode())
    os._exit(0)  # skip interpreter teardown: it is on every code reward's critical path


def _read_message(fd):
    """One length-prefixed marshal message from a trusted writer (rewards.run_sandboxed)."""
    n = int.from_bytes(_read_exact(fd, 8), "little")
    return marshal.loads(_read_exact(fd, n))


def _read_exact(fd, n):
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _isolate(libc, pretend):
    """Enter new pid + network namespaces (our children are in the pid one). -> (isolation, why the weaker)."""
    if os.geteuid() == 0 and not pretend:
        # The child will be the new pid namespace's init: kill(-1) from inside reaches only the namespace, and when
        # it dies the kernel kills everything left in it. The new network namespace has no interfaces but loopback.
        if libc.unshare(CLONE_NEWPID | CLONE_NEWNET) == 0:
            return "uid+ns", None
        return "uid", os.strerror(ctypes.get_errno())
    if pretend == "no_isolation":
        return "none", "pretended (test-only NANO_R1_SANDBOX_PRETEND=no_isolation)"
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET) == 0:
        return "userns", None
    return "none", os.strerror(ctypes.get_errno())


def _refusal(why, pretend):
    knobs = []
    for name in ("kernel/unprivileged_userns_clone", "kernel/apparmor_restrict_unprivileged_userns",
                 "user/max_user_namespaces"):
        try:
            with open(f"/proc/sys/{name}") as f:
                knobs.append(f"{name.replace('/', '.')} = {f.read().strip()}")
        except OSError:
            pass
    who = "pretending not to be root" if pretend else f"not running as root (euid {os.geteuid()})"
    return (f"the code sandbox refuses to run model-written code without isolation: {who}, and the kernel refused "
            f"a user namespace (unshare: {why}; {', '.join(knobs) or 'no user-namespace sysctls found'}). "
            "Fix: run as root (a fresh uid per run), or allow unprivileged user namespaces "
            "(kernel.unprivileged_userns_clone=1, kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor "
            "profile allowing userns, user.max_user_namespaces > 0). To accept weaker isolation knowingly, pass "
            "isolation='weak' (code_isolation='weak' to score_batch, --code-isolation=weak to grpo.py and eval.py): "
            "the code then runs as your own uid behind Python-level guards only, and can overwrite your files and kill "
            "your processes.")


# ----------------------------------------------------------------------------------------------------------------
# the judge: the tests run here, the model's names are proxies


def _judge(units, wanted, link):
    """Run each test unit against proxies of the model's names. -> (one "1"/"0" per unit, reason or None)."""
    def on_alarm(signum, frame):
        link["stop"] = link["stop"] or "timeout"
        raise _Stop
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(link["deadline"] - time.monotonic(), 0.001))
    g, bits, err = {"__name__": "__main__", "__builtins__": builtins}, "", None
    try:
        kind, payload = _receive(link)
        if kind == "error":
            err = ERRORS.get(payload, "exception")
        elif kind == "setup_error":  # a wall did not go up; the code never ran (or, if it forged this, scores 0)
            err, link["message"] = "sandbox_error", str(payload)[:500]
        elif kind == "ready" and type(payload) is dict:
            link["ready"] = True
            for name, spec in payload.items():
                if name in wanted and type(spec) is tuple and spec[:1] == ("call",):
                    g[name] = _proxy(name, link)
                elif name in wanted and type(spec) is tuple and len(spec) == 2 and spec[0] == "value":
                    g[name] = spec[1]
        else:
            _stop(link, "bad_reply")
        for src in units:
            if err or link["stop"]:
                break
            link["taint"], ok = None, True
            try:
                exec(compile(src, "<test>", "exec"), g)
            except BaseException:  # an assert, anything the test raises, _Stop
                ok = False
            # a test that caught the proxy's complaint (a bare except) still fails
            bits += "1" if ok and not link["taint"] and not link["stop"] else "0"
            link["reason"] = link["reason"] or link["taint"]
    except _Stop:
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return bits.ljust(len(units), "0"), err or link["stop"] or link["reason"]


def _proxy(name, link):
    def call(*args, **kwargs):
        return _call(link, name, args, kwargs)
    call.__name__ = call.__qualname__ = name
    return call


def _call(link, name, args, kwargs):
    if link["stop"]:
        raise _Stop
    try:
        _plain_size((args, kwargs), {})
    except Exception:  # ValueError, RecursionError
        link["taint"] = link["taint"] or "bad_args"
        raise TypeError(f"{name}: the test passes an argument that is not plain data; it cannot reach the sandbox")
    _send(link, (name, args, kwargs))
    kind, value = _receive(link)
    if kind == "ok":
        return value
    if kind == "raise" and type(value) is str:
        raise _raised(value)
    if kind == "bad":
        link["taint"] = link["taint"] or "not_plain"
        raise TypeError(f"{name} returned a {value!r}, which is not plain data")
    _stop(link, "bad_reply")


def _raised(name):
    """The judge's stand-in for an exception the model's function raised (see the module docstring)."""
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(f"{name} raised in the sandbox")
        except Exception:  # UnicodeDecodeError and friends want more arguments
            pass
    return ModelRaised(name)


def _stop(link, reason):
    link["stop"] = link["stop"] or reason
    raise _Stop


def _send(link, msg):
    try:
        _write_message(link["out"], msg)  # a model that stops reading blocks us here until the alarm
    except OSError:  # EPIPE: nobody reads any more
        _died(link)


def _receive(link):
    """The next message from the model's process, checked: a (kind, value) tuple of plain data."""
    head = _read_or_die(link, 4)
    n = int.from_bytes(head, "little")
    if n > REPLY_CAP:
        _stop(link, "bad_reply")
    data = _read_or_die(link, n)
    try:
        _check_marshal(data)
        msg = marshal.loads(data)
    except Exception:  # not plain data (a code object, a reference, ...), bad lengths, unhashable keys, bad utf-8
        _stop(link, "bad_reply")
    if type(msg) is not tuple or len(msg) != 2 or type(msg[0]) is not str:
        _stop(link, "bad_reply")
    return msg


def _check_marshal(data):
    """Raise ValueError unless data is one marshal value of format version 2 made of plain data only. Version 2
    has no back-references: marshal.loads crashes on hostile references (one to a tuple still being built, then
    hashed), and they could unfold a small message into a huge value. Every length is checked against the bytes
    present, because marshal allocates what a container claims before reading its items."""
    end = len(data)

    def value(pos, depth):
        if pos >= end or depth > MAX_DEPTH:
            raise ValueError("truncated or too deep")
        code, pos = data[pos], pos + 1
        if code in SCALARS:
            return pos + SCALARS[code]
        n = int.from_bytes(data[pos:pos + 4], "little", signed=True)
        if code in b"us":  # str (utf-8), bytes
            return pos + 4 + n if n >= 0 else end + 1
        if code == ord("l"):  # int beyond 32 bits: |n| 15-bit digits
            return pos + 4 + 2 * abs(n)
        if code in b"([<>":  # tuple, list, set, frozenset: n items (each at least a byte, so n is bounded too)
            pos += 4
            for _ in range(n):
                pos = value(pos, depth + 1)
            return pos
        if code == ord("{"):  # dict: key, value pairs until "0"
            while pos < end and data[pos] != ord("0"):
                pos = value(value(pos, depth + 1), depth + 1)
            return pos + 1
        raise ValueError(f"marshal type code {code!r} is not plain data")

    if value(0, 0) != end:
        raise ValueError("not exactly one value")


def _read_or_die(link, n):
    try:
        return _read_exact(link["in"], n)
    except (EOFError, OSError):
        _died(link)


def _died(link):
    """The model's process closed its end (it died, most likely): say why, from its exit status."""
    status = link["status"] = _wait(link["pid"], min(1.0, max(link["deadline"] - time.monotonic(), 0.0)))
    sig = os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None
    if status is None or sig in (signal.SIGXCPU, signal.SIGKILL):
        _stop(link, "timeout")  # the wall clock, or RLIMIT_CPU
    _stop(link, "died" if link["ready"] else "exit_before_tests")


def _plain_size(x, memo):
    """How many values x (a test's arguments) holds if it is plain data; ValueError if it is not (or is cyclic, or
    too big: shared sub-containers count each time they appear). marshal would turn a numpy array into bytes."""
    t = type(x)
    if t in ATOMS:
        return 1
    if t not in CONTAINERS:
        raise ValueError(f"not plain data: {t.__name__}")
    key = id(x)
    if key in memo:
        if memo[key] is None:
            raise ValueError("cyclic")
        return memo[key]
    memo[key] = None
    items = [v for kv in x.items() for v in kv] if t is dict else x
    if set(map(type, items)) <= ATOMS:
        n = 1 + len(items)  # the common case, at C speed
    else:
        n = 1 + sum(_plain_size(v, memo) for v in items)
    if n > MAX_ITEMS:
        raise ValueError("too big")
    memo[key] = n
    return n


# ----------------------------------------------------------------------------------------------------------------
# the supervisor's housekeeping


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


if __name__ == "__main__":
    _supervise()
