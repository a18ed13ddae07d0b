"""The demo native extension and its worker service.

Real work is checked in-process against pure-Python references. Faults are provoked in real child
interpreters, because a segfault, an abort or a GIL-holding spin would take pytest down with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import zlib

import msgspec
import psutil
import pytest

from minions.ipc.service import describe

CHILD_TIMEOUT = 30


def run_child(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (faulthandler on) and wait for it to end."""
    return subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )


def primes_below(n: int) -> int:
    """Reference sieve, slow but obviously right."""
    if n < 3:
        return 0
    sieve = bytearray([1]) * n
    sieve[0] = sieve[1] = 0
    for i in range(2, int(n**0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytearray(len(range(i * i, n, i)))
    return sum(sieve)


@pytest.fixture(scope="module")
def native():
    from native_demo import _native

    return _native


@pytest.fixture(scope="module")
def service():
    from native_demo.service import NativeDemo

    svc = NativeDemo()
    svc.setup()
    return svc


# --- real work ----------------------------------------------------------------------------------

CRC_INPUTS = [
    b"",
    b"a",
    b"123456789",
    bytes(range(256)),
    b"\xff" * 65535,  # just under the GIL-release threshold
    os.urandom(65536),  # exactly at it
    os.urandom(1024 * 1024),
]


@pytest.mark.parametrize("data", CRC_INPUTS, ids=lambda d: f"{len(d)}B")
def test_crc32_matches_zlib(native, data):
    assert native.crc32(data) == zlib.crc32(data)


def test_crc32_accepts_buffers_and_rejects_str(native):
    data = os.urandom(100_000)
    assert native.crc32(bytearray(data)) == zlib.crc32(data)
    assert native.crc32(memoryview(data)) == zlib.crc32(data)
    with pytest.raises(TypeError):
        native.crc32("not bytes")


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 100, 7919, 7920, 100_000])
def test_count_primes_matches_reference(native, n):
    assert native.count_primes(n) == primes_below(n)


def test_count_primes_releases_the_gil(native):
    """Another thread keeps running while the sieve works (it would stall if the GIL were held)."""
    import threading

    ticks = 0
    done = threading.Event()

    def ticker():
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            time.sleep(0)

    thread = threading.Thread(target=ticker)
    thread.start()
    try:
        before = ticks
        native.count_primes(30_000_000)
        during = ticks - before
    finally:
        done.set()
        thread.join()
    assert during > 100


def test_ping_returns_its_argument(native):
    for x in (0, 1, -7, 2**62, 2**100):
        assert native.ping(x) == x
    with pytest.raises(TypeError):
        native.ping("1")


def test_leak_accumulates_in_process(native):
    first = native.leak(0)
    assert native.leak(1) == first + 1
    assert native.leak(0) == first + 1
    with pytest.raises(ValueError):
        native.leak(-1)


# --- the service wrapper ------------------------------------------------------------------------


def test_service_exposes_annotated_handlers():
    from native_demo.service import NativeDemo

    specs = describe(NativeDemo)
    expected = {
        "crc32": (("data",), int),
        "count_primes": (("n",), int),
        "segfault": ((), type(None)),
        "abort": ((), type(None)),
        "leak": (("mib",), int),
        "spin": ((), type(None)),
        "ping": (("x",), int),
        "fail": (("message",), type(None)),
        "exit": (("code",), type(None)),
        "sleep": (("seconds",), type(None)),
        "unencodable": ((), int),
        "rss_mb": ((), float),
        "pid": ((), int),
    }
    assert {name: (s.params, s.result_type) for name, s in specs.items()} == expected


def test_service_handlers_in_process(service):
    assert service.crc32(b"123456789") == zlib.crc32(b"123456789")
    assert service.count_primes(100) == 25
    assert service.ping(41) == 41
    assert service.pid() == os.getpid()
    rss = service.rss_mb()
    assert isinstance(rss, float)
    assert rss > 1
    with pytest.raises(ValueError, match="boom"):
        service.fail("boom")
    with pytest.raises(TypeError):
        msgspec.msgpack.encode(service.unencodable())


def test_importing_service_does_not_load_the_extension():
    proc = run_child(
        """
        import sys
        import native_demo.service
        from minions.ipc.service import describe
        describe(native_demo.service.NativeDemo)
        print("native" if "native_demo._native" in sys.modules else "clean")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "clean"


# --- faults, each in a real child process -------------------------------------------------------

FATAL = [
    ("segfault", signal.SIGSEGV, "Segmentation fault"),
    ("abort", signal.SIGABRT, "Aborted"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("method", "signum", "banner"), FATAL, ids=[f[0] for f in FATAL])
def test_fatal_fault_kills_the_process_with_its_signal(method, signum, banner):
    proc = run_child(
        f"""
        from native_demo import _native
        print("calling", flush=True)
        _native.{method}()
        print("survived", flush=True)
        """
    )
    assert proc.returncode == -signum, (proc.returncode, proc.stderr)
    assert proc.stdout.split() == ["calling"]
    # faulthandler's dump is what the pool will attach to WorkerCrashed.
    assert f"Fatal Python error: {banner}" in proc.stderr
    assert "<string>" in proc.stderr  # the Python frame that made the call


@pytest.mark.timeout(30)
def test_service_exit_ends_the_process_with_its_code():
    proc = run_child(
        """
        from native_demo.service import NativeDemo
        svc = NativeDemo()
        svc.setup()
        svc.exit(7)
        print("survived")
        """
    )
    assert proc.returncode == 7
    assert "survived" not in proc.stdout


@pytest.mark.timeout(30)
def test_leak_really_grows_rss():
    proc = run_child(
        """
        import psutil
        from native_demo import _native
        me = psutil.Process()
        before = me.memory_info().rss
        total = _native.leak(64)
        after = me.memory_info().rss
        print(total, (after - before) / (1024 * 1024))
        """
    )
    assert proc.returncode == 0, proc.stderr
    total, grown_mib = proc.stdout.split()
    assert int(total) == 64
    assert float(grown_mib) >= 60


@pytest.mark.timeout(30)
def test_spin_holds_the_gil_until_sigkill():
    code = textwrap.dedent(
        """
        import sys
        from native_demo import _native
        print("spinning", flush=True)
        _native.spin()
        print("returned", flush=True)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "spinning"
        ps = psutil.Process(child.pid)
        # After the line, the only CPU the child can burn is in spin(): watch it burn some.
        start = sum(ps.cpu_times()[:2])
        deadline = time.monotonic() + 10
        while sum(ps.cpu_times()[:2]) - start < 0.2:
            assert child.poll() is None, "spin() returned or the child died"
            assert time.monotonic() < deadline, "child is not burning CPU"
            time.sleep(0.02)
        # SIGINT only sets a flag for the interpreter, which never regains the GIL to act on it.
        child.send_signal(signal.SIGINT)
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=0.5)
        assert child.poll() is None
        child.kill()
        assert child.wait(timeout=10) == -signal.SIGKILL
        assert "returned" not in child.stdout.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()
    assert not psutil.pid_exists(child.pid) or psutil.Process(child.pid).status() == "zombie"
