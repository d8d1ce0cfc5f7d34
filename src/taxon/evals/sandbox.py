"""Run generated code walled in: one program per child process, in a throw-away directory.

Each program runs in a fresh `python -I` (no environment variables, no user site, no script
folder on sys.path) whose cwd, HOME and TMPDIR are a new temporary directory, removed afterwards.
The guards, strongest first; `guards()` says which hold on this machine (each is probed once):

- landlock (Linux >= 5.13, no privileges needed): the kernel refuses writing, creating, removing
  or renaming anything outside the directory, and reading or executing anything but the directory
  and what Python needs (`readable_paths`: its installation and every folder on its `sys.path`,
  the system's shared libraries, the time-zone data); from landlock ABI 4 also TCP bind/connect,
  from ABI 6 signals to processes outside the sandbox. So a program cannot read the user's files
  (an API key file, ~/.ssh, /etc/shadow as root) into its stored output.
- `unshare --net --pid --fork --kill-child` inside a user namespace (no root needed where user
  namespaces are allowed): no network interface but a loopback that is down, and every process the
  program starts dies with it.
- resource limits set before the program runs: CPU seconds, address space (RLIMIT_AS), file size,
  no core dumps; the wall clock is enforced from outside by killing the process group.
- an audit hook (PEP 578), always: refuses sockets, subprocesses, exec/fork/spawn, kill, writes
  outside the directory, opening files outside the readable paths, ctypes calls and raising the
  limits, with a message naming what was
  refused. A hook cannot be removed from inside, but PEP 578 hooks are not a boundary against a
  determined attacker; they catch ordinary misbehaviour of model output with a clear reason, and
  the kernel guards above hold regardless.

Outcomes: `passed` (the program ran to its end), `failed` (it raised: a test assertion or any other
exception), `timeout` (wall or CPU limit), `error` (the sandbox refused something, the memory or
file-size limit was hit, or the process died from a signal); with the reason.
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

Status = Literal["passed", "failed", "timeout", "error"]

# Exit statuses the bootstrap uses to say how the program ended.
EXIT_FAILED, EXIT_PASSED, EXIT_REFUSED, EXIT_MEMORY, EXIT_FILE_SIZE = 1, 100, 101, 102, 103
PROGRAM = "program.py"
OUTPUT = "output.txt"
REASON_CHARS = 300


@dataclass(frozen=True)
class Limits:
    timeout: float = 3.0  # wall seconds (HumanEval's harness uses 3)
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file the program may write


@dataclass(frozen=True)
class Outcome:
    status: Status
    reason: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The child's first code, run with `python -I -c`. argv: directory, CPU s, AS bytes, file bytes,
# landlock ABI to use (0: none), audit hook (1/0). Order matters: landlock needs ctypes (before
# the hook forbids it) and memory (before RLIMIT_AS); the hook goes in last, right before the program.
BOOTSTRAP = r'''
import os, sys, resource
root = sys.argv[1]
cpu, mem, fsize, abi, use_hook = (int(a) for a in sys.argv[2:7])

# What Python needs to read (and map as code): its installation, the folders on its sys.path,
# the shared libraries extension modules load, the time-zone data. Nothing else of the machine.
SYSTEM_READABLE = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/usr/share/zoneinfo",
                   "/etc/ld.so.cache", "/etc/localtime", "/dev/null", "/dev/zero", "/dev/urandom")

def readable_paths(root):
    found = [root]
    for p in (*sys.path, sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
              os.path.dirname(sys.executable), *SYSTEM_READABLE):
        if p and os.path.exists(p):
            found.append(os.path.realpath(p))
    return sorted(set(found))

def landlock(root, abi, readable):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    read = (1 << 0) | (1 << 2) | (1 << 3)  # execute, read file, read directory
    fs = read | (1 << 1) | sum(1 << b for b in range(4, 13))  # write file; remove, make anything
    fs |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0) | (1 << 15 if abi >= 5 else 0)
    net = 3 if abi >= 4 else 0  # TCP bind, TCP connect: handled, no rule allows them
    scoped = 3 if abi >= 6 else 0  # abstract unix sockets, signals
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
    size = 8 * (3 if abi >= 6 else 2 if abi >= 4 else 1)
    ruleset = libc.syscall(444, ctypes.byref(attr), ctypes.c_size_t(size), 0)
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    class Beneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]
    file_only = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 14) | (1 << 15)
    rules = [(root, fs), ("/dev/null", fs & file_only)]
    rules += [(p, read) for p in readable if p not in (root, "/dev/null")]
    for path, rights in rules:
        rights = rights if os.path.isdir(path) else rights & file_only
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        if libc.syscall(445, ruleset, 1, ctypes.byref(Beneath(rights, fd)), 0) < 0:
            raise OSError(ctypes.get_errno(), "landlock_add_rule " + path)
        os.close(fd)
    if libc.prctl(38, 1, 0, 0, 0) < 0 or libc.syscall(446, ruleset, 0) < 0:  # no_new_privs
        raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    os.close(ruleset)

readable = readable_paths(os.path.realpath(root))
if abi:
    landlock(root, abi, readable)
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
with open("program.py") as f:
    source = f.read()

def install(root, readable, write=os.write, realpath=os.path.realpath, fsdecode=os.fsdecode):
    prefix = root.rstrip("/") + "/"
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    readable = tuple(readable)
    refused = []
    def inside(path):
        if isinstance(path, int):
            return True  # an already open descriptor: it was checked when opened
        path = realpath(fsdecode(path))
        return path == root or path.startswith(prefix) or path == "/dev/null"
    def can_read(path):
        if isinstance(path, int):
            return True
        path = realpath(fsdecode(path))
        return any(path == r or path.startswith(r.rstrip("/") + "/") for r in readable)
    def refuse(event, what):
        msg = "sandbox refused " + event + ": " + repr(what)[:200]
        refused.append(msg)
        write(2, ("\n" + msg + "\n").encode())
        raise PermissionError(msg)
    blocked = ("socket.", "subprocess.", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn",
               "os.spawn", "os.system", "os.kill", "os.killpg", "signal.pthread_kill", "pty.",
               "resource.setrlimit", "resource.prlimit", "ctypes.call_function", "ctypes.dlsym",
               "ctypes.cdata", "webbrowser.", "ftplib.", "smtplib.", "http.", "urllib.")
    paths = ("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
             "os.utime", "os.chflags", "os.setxattr", "os.removexattr", "shutil.rmtree",
             "shutil.chown", "shutil.make_archive")
    both = ("os.rename", "shutil.move")  # (source, destination): both change the file system
    second = ("os.link", "os.symlink", "shutil.copyfile", "shutil.copymode", "shutil.copystat")
    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if path is not None and (flags or 0) & writing and not inside(path):
                refuse(event, path)
            elif path is not None and not can_read(path):
                refuse(event, path)
        elif event.startswith(blocked):
            refuse(event, args)
        elif event == "ctypes.dlopen" and args[0] is not None:
            refuse(event, args[0])
        elif event in paths or event in both or event in second:
            checked = args[:2] if event in both else args[1:2] if event in second else args[:1]
            for p in checked:
                if isinstance(p, (str, bytes, os.PathLike)) and not inside(p):
                    refuse(event, p)
    sys.addaudithook(hook)
    return refused

import traceback
refused = install(os.path.realpath(root), readable) if use_hook else []
code = compile(source, "program.py", "exec")
status = 1
try:
    exec(code, {"__name__": "__main__", "__file__": os.path.join(root, "program.py")})
    status = 100
except SystemExit as e:  # the tests after the exit never ran
    sys.stderr.write("SystemExit: the program exited (status %r) before its end\n" % (e.code,))
except MemoryError:
    status = 102
except BaseException as e:
    if isinstance(e, OSError) and e.errno == 27:  # EFBIG: the file-size limit
        status = 103
    else:
        traceback.print_exc()
if refused:
    status = 101
sys.stdout.flush()
sys.stderr.flush()
os._exit(status)
'''


def _landlock_abi() -> int:
    """The kernel's landlock ABI version, 0 where it has none (or not Linux)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        abi = libc.syscall(444, None, ctypes.c_size_t(0), 1)  # LANDLOCK_CREATE_RULESET_VERSION
    except (OSError, AttributeError):
        return 0
    return max(0, int(abi))


UNSHARE = ("unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child")


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        r = subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


@cache
def guards() -> dict[str, bool | int]:
    """Which guards this machine allows (probed once): `landlock` (ABI version, 0: none),
    `namespaces` (network and pid namespaces via unshare), and the always-present ones."""
    return {"landlock": _landlock_abi(), "namespaces": _unshare_works(), "rlimits": True,
            "audit_hook": True, "process_group_kill": True}


def _command(root: str, limits: Limits, audit_hook: bool) -> list[str]:
    g = guards()
    cpu = math.ceil(limits.timeout) + 1
    argv = [sys.executable, "-I", "-c", BOOTSTRAP, root, str(cpu), str(limits.memory_mb << 20),
            str(limits.file_mb << 20), str(min(int(g["landlock"]), 6)), str(int(audit_hook))]
    return [*UNSHARE, *argv] if g["namespaces"] else argv


def _env(root: str) -> dict[str, str]:
    # One thread per numeric library: OpenBLAS and friends otherwise reserve address space per core.
    threads = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    return {"HOME": root, "TMPDIR": root, "PATH": os.defpath, "LANG": "C.UTF-8", "MPLBACKEND": "Agg",
            **threads}


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][-REASON_CHARS:] if lines else ""


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_program(source: str, limits: Limits = Limits(), *, audit_hook: bool = True) -> Outcome:
    """Run `source` as a program in a fresh sandbox; how it ended, and why. `audit_hook=False`
    leaves only the kernel guards, so tests can show that they hold on their own."""
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="taxon-sandbox-") as root:
        root = os.path.realpath(root)
        Path(root, PROGRAM).write_text(source)
        with open(Path(root, OUTPUT), "wb") as out:
            proc = subprocess.Popen(_command(root, limits, audit_hook), cwd=root, env=_env(root),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=limits.timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            # Kill the group either way: nothing the program started outlives it.
            _kill(proc)
        seconds = time.monotonic() - t0
        last = _tail(Path(root, OUTPUT))
        shutil.rmtree(root, ignore_errors=True)
    if timed_out:
        return Outcome("timeout", f"wall-clock limit of {limits.timeout:g} s", seconds)
    return _outcome(code, last, limits, seconds)


def _outcome(code: int, last: str, limits: Limits, seconds: float) -> Outcome:
    if code == EXIT_PASSED:
        return Outcome("passed", "", seconds)
    if code == 0:  # only os._exit(0) gets here: the bootstrap never returns 0
        return Outcome("failed", "the program exited before its end", seconds)
    if code == EXIT_FAILED:
        return Outcome("failed", last or "the program raised an exception", seconds)
    if code == EXIT_REFUSED:
        return Outcome("error", last, seconds)
    if code == EXIT_MEMORY:
        return Outcome("error", f"memory limit of {limits.memory_mb} MB", seconds)
    if code == EXIT_FILE_SIZE:
        return Outcome("error", f"file-size limit of {limits.file_mb} MB", seconds)
    if code in (-signal.SIGXCPU, 128 + signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGKILL):
        return Outcome("timeout", f"CPU limit of {math.ceil(limits.timeout) + 1} s", seconds)
    if code < 0 or code > 128:
        sig = -code if code < 0 else code - 128
        return Outcome("error", f"killed by signal {signal.Signals(sig).name}", seconds)
    return Outcome("failed", last or f"exit status {code}", seconds)


def default_workers() -> int:
    return max(1, (os.cpu_count() or 1))


def run_programs(sources: Sequence[str], limits: Limits = Limits(), workers: int | None = None,
                 desc: str = "sandbox") -> list[Outcome]:
    """`run_program` over many sources, `workers` at a time, in order."""
    out: list[Outcome | None] = [None] * len(sources)
    bar = tqdm(total=len(sources), desc=desc, unit="prog", dynamic_ncols=True, leave=False)
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        futures = {pool.submit(run_program, s, limits): i for i, s in enumerate(sources)}
        for future in futures:
            out[futures[future]] = future.result()
            bar.update(1)
    bar.close()
    return out  # type: ignore[return-value]
