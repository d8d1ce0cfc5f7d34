"""The sandbox: a correct program passes, a failing one fails with its reason, and it refuses
writes outside its directory, sockets, endless loops, memory hogs, subprocesses and forks. The
kernel guards (landlock, network namespace) are also shown to hold with the audit hook off."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from taxon.evals.sandbox import Limits, guards, run_program, run_programs

FAST = Limits(timeout=2.0, memory_mb=512)


@pytest.fixture
def outside(tmp_path) -> Path:
    """A path outside any sandbox directory that a program must not create."""
    return tmp_path / f"escape-{uuid.uuid4().hex}.txt"


def test_correct_program_passes_quickly():
    o = run_program("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n", FAST)
    assert o.status == "passed" and o.reason == ""
    assert o.seconds < 1.0


def test_failing_assertion_fails_with_its_message():
    o = run_program("assert 1 + 1 == 3, 'arithmetic'\n", FAST)
    assert o.status == "failed" and "AssertionError: arithmetic" in o.reason


def test_syntax_error_fails():
    o = run_program("def f(:\n", FAST)
    assert o.status == "failed" and "SyntaxError" in o.reason


def test_exiting_before_the_tests_is_not_a_pass():
    assert run_program("import sys\nsys.exit(0)\nassert False\n", FAST).status == "failed"
    assert run_program("import os\nos._exit(0)\n", FAST).status == "failed"



@pytest.mark.parametrize("how", [
    "open({p!r}, 'w').write('x')",
    "import os\nos.close(os.open({p!r}, os.O_WRONLY | os.O_CREAT))",
    "try:\n    open({p!r}, 'a').write('x')\nexcept OSError:\n    pass",  # swallowing it is no help
    "import shutil\nshutil.copyfile('/etc/hostname', {p!r})",
])
def test_refuses_writing_outside_its_directory(outside, how):
    o = run_program(how.format(p=str(outside)) + "\n", FAST)
    assert o.status == "error" and "sandbox refused" in o.reason, o
    assert not outside.exists()


def test_refuses_a_socket():
    o = run_program("import socket\ns = socket.socket()\ns.connect(('93.184.216.34', 80))\n", FAST)
    assert o.status == "error" and "socket" in o.reason


def test_kills_an_endless_loop_within_the_limit():
    t0 = time.monotonic()
    o = run_program("while True:\n    pass\n", Limits(timeout=1.0))
    assert o.status == "timeout"
    assert time.monotonic() - t0 < 3.0


def test_kills_a_sleeper_on_the_wall_clock():
    o = run_program("import time\ntime.sleep(60)\n", Limits(timeout=1.0))
    assert o.status == "timeout" and "wall-clock" in o.reason


def test_memory_limit():
    o = run_program("x = bytearray(2 << 30)\n", Limits(memory_mb=256))
    assert o.status == "error" and "memory limit" in o.reason


def test_file_size_limit():
    o = run_program("open('big', 'wb').write(b'x' * (8 << 20))\n", Limits(file_mb=1))
    assert o.status == "error" and "file-size" in o.reason


@pytest.mark.parametrize("src", [
    "import os\nwhile True:\n    os.fork()\n",
    "import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '60'])\n",
    "import os\nos.system('sleep 60 &')\n",
])
def test_refuses_spawning_processes(src):
    o = run_program(src, FAST)
    assert o.status == "error" and "sandbox refused" in o.reason


def test_refuses_raising_its_limits_and_calling_c():
    o = run_program("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n", FAST)
    assert o.status == "error" and "setrlimit" in o.reason
    o = run_program("import ctypes\nctypes.CDLL(None).system(b'true')\n", FAST)
    assert o.status == "error" and "ctypes" in o.reason


def test_libraries_still_import():
    o = run_program("import numpy as np\nassert int(np.arange(4).sum()) == 6\n", Limits(memory_mb=2048))
    assert o.status == "passed", o


def test_many_programs_keep_their_order():
    outs = run_programs([f"assert {i} % 2 == 0\n" for i in range(6)], FAST, workers=3)
    assert [o.status for o in outs] == ["passed", "failed"] * 3


# --- the kernel guards alone (audit hook off): they hold even if the hook were bypassed ---------


@pytest.mark.skipif(guards()["landlock"] < 4, reason="this kernel has no landlock network rules")
def test_landlock_alone_refuses_tcp():
    o = run_program("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))\n", FAST,
                    audit_hook=False)
    assert o.status == "failed" and "PermissionError" in o.reason


@pytest.mark.skipif(not guards()["landlock"], reason="this kernel has no landlock")
def test_landlock_alone_refuses_writing_outside(outside):
    o = run_program(f"open({str(outside)!r}, 'w').write('x')\n", FAST, audit_hook=False)
    assert o.status == "failed" and "PermissionError" in o.reason
    assert not outside.exists()


@pytest.mark.skipif(not guards()["namespaces"], reason="no unprivileged network namespace here")
def test_network_namespace_alone_has_no_route():
    # UDP: landlock (ABI >= 4) refuses TCP connect itself, so TCP would not show the namespace.
    o = run_program("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                    "s.sendto(b'x', ('93.184.216.34', 53))\n", FAST, audit_hook=False)
    assert o.status == "failed" and "unreachable" in o.reason.lower(), o


def test_runs_in_a_throwaway_home():
    src = ("import os\nassert os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR']\n"
           "open('scratch.txt', 'w').write('x')\nos.mkdir('d')\nos.remove('scratch.txt')\n"
           "open('/tmp/where.txt', 'a')\n")
    o = run_program(src, FAST)
    assert o.status == "error" and "/tmp/where.txt" in o.reason  # the sandbox dir is not /tmp
    assert run_program(src.rsplit("open(", 1)[0], FAST).status == "passed"


def test_its_directory_is_removed_afterwards():
    o = run_program("import os\nraise RuntimeError('cwd=' + os.getcwd())\n", FAST)
    where = Path(o.reason.split("cwd=", 1)[1])
    assert o.status == "failed" and where.name.startswith("taxon-sandbox-")
    assert not where.exists()


# --- reading: only Python's installation, its sys.path and the program's own folder -------------


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file the user can read, outside the sandbox and outside Python's installation."""
    path = tmp_path / "api-key.txt"
    path.write_text("sk-secret-7f3a\n")
    return path


READS = [
    "print(open({p!r}).read())",
    "import pathlib\nprint(pathlib.Path({p!r}).read_bytes())",
    "import os\nprint(os.read(os.open({p!r}, os.O_RDONLY), 100))",
]


@pytest.mark.parametrize("how", READS)
def test_refuses_reading_files_outside(secret, how):
    o = run_program(how.format(p=str(secret)) + "\n", FAST)
    assert o.status == "error" and "sandbox refused" in o.reason, o
    assert "sk-secret" not in o.reason


@pytest.mark.skipif(not guards()["landlock"], reason="this kernel has no landlock")
@pytest.mark.parametrize("how", READS)
def test_landlock_alone_refuses_reading_outside(secret, how):
    o = run_program(how.format(p=str(secret)) + "\n", FAST, audit_hook=False)
    assert o.status == "failed" and "PermissionError" in o.reason, o
    assert "sk-secret" not in o.reason


@pytest.mark.skipif(not guards()["landlock"], reason="this kernel has no landlock")
def test_landlock_alone_refuses_system_secrets_and_listing_home():
    for path in ("/etc/shadow", "/etc/passwd"):
        if Path(path).exists():
            o = run_program(f"open({path!r}).read()\n", FAST, audit_hook=False)
            assert o.status == "failed" and "PermissionError" in o.reason, (path, o)
    o = run_program(f"import os\nos.listdir({str(Path.home())!r})\n", FAST, audit_hook=False)
    assert o.status == "failed" and "PermissionError" in o.reason, o


def test_reads_its_own_folder_and_the_standard_library():
    src = ("open('data.txt', 'w').write('42')\nassert open('data.txt').read() == '42'\n"
           "import json, decimal, datetime, hashlib, sqlite3, zoneinfo, collections\n"
           "assert hashlib.sha256(b'x').hexdigest()\nimport numpy\n")
    o = run_program(src, Limits(memory_mb=2048))
    assert o.status == "passed", o
    o = run_program(src, Limits(memory_mb=2048), audit_hook=False)
    assert o.status == "passed", o
