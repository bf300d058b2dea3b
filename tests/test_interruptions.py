"""Interrupted runs and hostile file systems: OUTPUT appears only when complete, nothing is lost.

* SIGKILL mid-write leaves no OUTPUT (only the hidden partial folder, which the next run removes);
  a killed ``--overwrite`` run leaves the previous OUTPUT intact.
* SIGINT (Ctrl-C) and SIGTERM: exit 130 promptly, one line, no OUTPUT, no partial folder.
* ENOSPC for real (a small tmpfs), a read-only OUTPUT parent (a read-only tmpfs / bind mount when
  running as root, since root ignores permission bits; ``chmod 555`` otherwise): exit 5, one line.
* SOURCE changing during the run (size/mtime re-checked before OUTPUT is published): exit 3.

The mount-based tests need CAP_SYS_ADMIN; where ``mount`` is refused they skip and say so.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.helpers import REPO, run_cli, start_cli, wait_stopped
from support.hostile import SHARD, assert_clean_failure, fixture_copy, leftovers, tree_hashes

from gptq2xpu.write.output import STAGE_TAG

# ------------------------------------------------------------------------------ a slow-enough source


@pytest.fixture(scope="module")
def big_source(tmp_path_factory):
    """A synthetic GPTQ MoE checkpoint of ~210 MB: one shard of it is hundreds of chunks, so a run
    stopped after its first chunk is far from done."""
    from gptq2xpu.testing.synth import make_checkpoint

    root = tmp_path_factory.mktemp("big") / "src"
    make_checkpoint(root, hidden=1024, moe_intermediate=512, num_experts=64, num_layers=4,
                    fast=True, attention=False, vocab=64)
    stats = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.iterdir()}
    yield root
    # nothing in this module may modify the source (mtime is restored where a test touches it)
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.iterdir()} == stats


def start_convert(src: Path, out: Path, *extra) -> subprocess.Popen:
    """``convert`` in a fresh interpreter that stops itself (SIGSTOP) right after writing its first
    chunk: :func:`wait_mid_write` then finds it mid-write, however loaded the machine is."""
    return start_cli("convert", src, out, *extra, faults=[("gptq2xpu.write.shards:_write_all", "after:SIGSTOP", 1)])


def wait_mid_write(proc: subprocess.Popen, out: Path) -> Path:
    """Wait until the run has stopped itself mid-write (see :func:`start_convert`); returns its
    hidden partial folder, which holds the shards being filled.  The run stays stopped: SIGKILL
    ends it as it is, other signals wait in the queue until :func:`resume`."""
    wait_stopped(proc)
    [stage] = out.parent.glob(f".{out.name}{STAGE_TAG}*")
    assert any(p.stat().st_size > 0 for p in stage.iterdir() if f".tmp-{proc.pid}-" in p.name)
    return stage


def resume(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    """Let the stopped run go on (SIGCONT) and wait for its end (the timeout only guards against a hang)."""
    proc.send_signal(signal.SIGCONT)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def check_output_manifest(out: Path) -> dict:
    v = run_cli("verify", out)
    assert v.returncode == 0, v.stdout + v.stderr
    return tree_hashes(out)


# ------------------------------------------------------------------------------ SIGKILL


def test_sigkill_mid_run_then_clean_rerun(big_source, tmp_path):
    out = tmp_path / "out"
    proc = start_convert(big_source, out, "--jobs", "1")
    stage = wait_mid_write(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(300)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed run must leave no OUTPUT"
    assert stage.is_dir(), "expected the killed run's hidden partial folder (nothing else could remove it)"

    rerun = run_cli("convert", big_source, out, "--jobs", "2")
    assert rerun.returncode == 0, rerun.stderr
    assert "Traceback" not in rerun.stderr
    assert not stage.exists(), "the stale partial folder of the killed run was not removed"
    assert leftovers(out) == []
    check_output_manifest(out)


def test_sigkill_during_overwrite_keeps_old_output(big_source, tmp_path):
    out = tmp_path / "out"
    first = run_cli("convert", fixture_copy(tmp_path / "small"), out)  # an existing converted OUTPUT
    assert first.returncode == 0, first.stderr
    before = tree_hashes(out)

    proc = start_convert(big_source, out, "--overwrite", "--jobs", "1")
    wait_mid_write(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(300)
    assert proc.returncode == -signal.SIGKILL
    assert tree_hashes(out) == before, "a killed --overwrite run touched the previous OUTPUT"
    check_output_manifest(out)


# ------------------------------------------------------------------------------ SIGINT / SIGTERM


@pytest.mark.parametrize("sig,jobs,shards", [(signal.SIGINT, 1, 1), (signal.SIGINT, 2, 1), (signal.SIGTERM, 2, 1),
                                              (signal.SIGINT, 8, 3), (signal.SIGTERM, 8, 3)],
                         ids=["sigint-jobs1", "sigint-jobs2", "sigterm-jobs2", "sigint-jobs8-shards-at-once",
                              "sigterm-jobs8-shards-at-once"])
def test_signal_mid_run_exits_130_and_cleans_up(big_source, tmp_path, sig, jobs, shards):
    """The signal reaches the run while it is stopped after its first chunk (as ``kill %1`` does to
    a stopped job: SIGTERM, then SIGCONT), so whichever of its threads resumes first could take it.
    It exits 130 without finishing any shard it had begun: kept through hard links, each partial
    shard is still short of its planned size (a run that finished the shards under way before it
    stopped would have completed them)."""
    from gptq2xpu.convert import make_plan
    from gptq2xpu.plan import ConvertOptions
    from gptq2xpu.read import open_checkpoint

    out = tmp_path / "out"
    size = [] if shards == 1 else ["--max-shard-size", "100MB"]  # ~210 MB: 3 shards, written at once
    with open_checkpoint(big_source) as ckpt:
        options = ConvertOptions(**({} if shards == 1 else {"max_shard_size": 100_000_000}))
        planned = {s.name: s.layout.file_size for s in make_plan(ckpt, options).shards}
    assert len(planned) == shards
    proc = start_convert(big_source, out, "--jobs", jobs, *size)
    stage = wait_mid_write(proc, out)
    kept = tmp_path / "kept"
    kept.mkdir()
    for part in stage.glob(f".*.tmp-{proc.pid}-*"):
        os.link(part, kept / part.name)
    proc.send_signal(sig)
    result = resume(proc)
    assert_clean_failure(result, 130, out, "interrupted", "SIGINT" if sig == signal.SIGINT else "SIGTERM")
    sizes = {p.name.split(".tmp-")[0][1:]: p.stat().st_size for p in kept.iterdir()}
    assert sizes and all(sizes[name] < planned[name] for name in sizes), (sizes, planned)


@contextlib.contextmanager
def _plan(src: Path, max_shard_size: int):
    """``(plan, checkpoint)`` of ``src`` converted into shards of at most ``max_shard_size`` bytes."""
    from gptq2xpu.convert import make_plan
    from gptq2xpu.plan import ConvertOptions
    from gptq2xpu.read import open_checkpoint

    with open_checkpoint(src) as ckpt:
        yield make_plan(ckpt, ConvertOptions(max_shard_size=max_shard_size)), ckpt


def test_an_interrupt_while_the_shards_are_handed_out_stops_the_started_ones(tmp_path, monkeypatch):
    """Ctrl-C between starting the first shard's thread and the second's: the first stops at its
    next chunk instead of being written to the end (for a model, gigabytes) before the run exits.
    The first shard waits, after its first chunk, until the writing is stopped, so nothing here
    depends on which thread runs when (the timeout only guards against a hang)."""
    import threading

    from gptq2xpu.errors import Interrupted
    from gptq2xpu.write import shards as module

    begun, stopped = threading.Event(), threading.Event()
    waited = []
    real_stop = module.ShardWriter.stop

    def stop(self):
        stopped.set()
        real_stop(self)

    def progress(_n):  # the first shard's first chunk is written
        if not waited:
            begun.set()
            waited.append(stopped.wait(60))

    class Executor(module.ThreadPoolExecutor):
        shards_handed_out = 0

        def submit(self, fn, *args, **kwargs):
            if self._thread_name_prefix == "gptq2xpu-shard":
                Executor.shards_handed_out += 1
                if Executor.shards_handed_out == 2:  # the handler raises as the second is handed out
                    assert begun.wait(60), "the first shard never wrote a chunk"
                    raise Interrupted("stopped by SIGINT (Ctrl-C)")
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(module.ShardWriter, "stop", stop)
    monkeypatch.setattr(module, "ThreadPoolExecutor", Executor)
    folder = tmp_path / "stage"
    folder.mkdir()
    with _plan(fixture_copy(tmp_path / "src"), 1_000_000) as (plan, ckpt), pytest.raises(Interrupted):
        assert len(plan.shards) >= 2
        module.write_shards(plan, ckpt, folder, range(len(plan.shards)), jobs=4, progress=progress)
    assert waited == [True], "the writing went on after the interrupt"
    assert list(folder.iterdir()) == []  # the first shard stopped: its temporary file is gone, none was named


def test_a_signal_taken_by_a_thread_the_run_did_not_start_still_stops_the_writing(tmp_path, monkeypatch):
    """A thread the run did not start (a progress bar's, say) may take the signal: the main thread,
    waiting for the shards, still acts on it (it wakes every POLL_S) and stops them.  The first
    shard waits, after its first chunk, until the writing is stopped (the timeout only guards
    against a hang)."""
    import threading

    from gptq2xpu.errors import Interrupted
    from gptq2xpu.write import shards as module

    stopped = threading.Event()
    waited = []
    real_stop = module.ShardWriter.stop

    def stop(self):
        stopped.set()
        real_stop(self)

    def foreign():  # a thread that does not block the signal (made by a writer thread, it starts blocking
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])  # it) signals itself: it takes the signal
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

    def progress(_n):  # a shard's first chunk is written: that shard waits until the writing is stopped
        if not waited:
            thread = threading.Thread(target=foreign)
            thread.start()
            thread.join()
            waited.append(stopped.wait(60))

    def handler(_signum, _frame):
        raise Interrupted("terminated by SIGTERM")

    monkeypatch.setattr(module.ShardWriter, "stop", stop)
    previous = signal.signal(signal.SIGTERM, handler)
    folder = tmp_path / "stage"
    folder.mkdir()
    try:
        with _plan(fixture_copy(tmp_path / "src"), 1_000_000) as (plan, ckpt), pytest.raises(Interrupted):
            module.write_shards(plan, ckpt, folder, range(len(plan.shards)), jobs=4, progress=progress)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert waited == [True], "the writing went on after the signal"
    # the waiting shard stopped at its next chunk (another may have been completed meanwhile)
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) < len(plan.shards) and not any(".tmp-" in n for n in names), names


def test_the_writing_threads_leave_signals_to_the_main_thread(tmp_path, monkeypatch):
    """The kernel gives a signal to any thread that does not block it, and Python acts on it only
    when its main thread next runs: every thread a conversion starts (builders, shard hashers,
    audit) blocks SIGINT and SIGTERM."""
    import threading

    import gptq2xpu.convert as convert_module
    from gptq2xpu.plan import ConvertOptions
    from gptq2xpu.write import shards as module

    masks: dict[str, set] = {}

    def record():
        name = threading.current_thread().name.rsplit("_", 1)[0]
        masks.setdefault(name, set()).add(frozenset(signal.pthread_sigmask(signal.SIG_BLOCK, [])))

    def recording(real):
        def wrapper(*args, **kwargs):
            record()
            return real(*args, **kwargs)
        return wrapper

    for owner, name in ((module, "_write_all"), (module, "_write_one"), (convert_module, "audit")):
        monkeypatch.setattr(owner, name, recording(getattr(owner, name)))
    convert_module.convert(fixture_copy(tmp_path / "src"), tmp_path / "out", jobs=8,
                           options=ConvertOptions(max_shard_size=1_000_000))
    assert set(masks) == {"gptq2xpu", "gptq2xpu-shard", "gptq2xpu-audit"}, masks
    for name, seen in masks.items():
        assert all({signal.SIGINT, signal.SIGTERM} <= mask for mask in seen), (name, seen)
    assert not {signal.SIGINT, signal.SIGTERM} & signal.pthread_sigmask(signal.SIG_BLOCK, [])  # this thread's


def test_the_verifying_threads_leave_signals_to_the_main_thread(tmp_path, monkeypatch):
    """As for a conversion: every thread ``verify --source`` starts (the manifest's hashers, the
    bit-exact comparison's) blocks SIGINT and SIGTERM, and the main thread waiting for them wakes
    every POLL_S, so Ctrl-C stops a verification within moments, not after the last file is hashed."""
    import threading

    import gptq2xpu.convert as convert_module
    import gptq2xpu.verify.bits as bits_module
    import gptq2xpu.verify.standalone as standalone_module
    from gptq2xpu.plan import ConvertOptions
    from gptq2xpu.verify.runner import verify

    src, out = fixture_copy(tmp_path / "src"), tmp_path / "out"
    convert_module.convert(src, out, jobs=2, options=ConvertOptions(max_shard_size=1_000_000))
    masks: dict[str, set] = {}

    def recording(real):
        def wrapper(*args, **kwargs):
            name = threading.current_thread().name.rsplit("_", 1)[0]
            masks.setdefault(name, set()).add(frozenset(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
            return real(*args, **kwargs)
        return wrapper

    for owner, name in ((standalone_module, "sha256_fd"), (bits_module, "check_layer_bits")):
        monkeypatch.setattr(owner, name, recording(getattr(owner, name)))
    report = verify(out, src, numeric=False, jobs=4)
    assert report["status"] == "pass", report["failures"]
    assert set(masks) == {"gptq2xpu-hash", "gptq2xpu-bits"}, masks
    for name, seen in masks.items():
        assert all({signal.SIGINT, signal.SIGTERM} <= mask for mask in seen), (name, seen)
    assert not {signal.SIGINT, signal.SIGTERM} & signal.pthread_sigmask(signal.SIG_BLOCK, [])  # this thread's


def test_a_main_thread_waiting_for_a_worker_acts_on_a_signal_another_thread_took():
    """``result_of`` (what verify waits for its hashers with): a signal that a thread not blocking
    it took is acted on while the worker is still busy, not once it is done (the worker's own
    wait of 20 s only guards against a hang).  The signal comes once the main thread is waiting
    (after 0.3 s; should the main thread be slower, it is acted on before and the test proves less)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from gptq2xpu.errors import Interrupted
    from gptq2xpu.interrupts import result_of, signals_to_the_main_thread

    release = threading.Event()

    def busy():
        release.wait(20)
        return "done"

    def foreign():  # does not block SIGTERM, and signals itself: the kernel hands it the signal
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
        time.sleep(0.3)
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

    def handler(_signum, _frame):
        raise Interrupted("terminated by SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with ThreadPoolExecutor(1, initializer=signals_to_the_main_thread) as pool:
            future = pool.submit(busy)
            try:
                with pytest.raises(Interrupted):
                    threading.Thread(target=foreign).start()
                    result_of(future)
                assert not future.done(), "the signal was acted on only once the worker had finished"
            finally:
                release.set()
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------ mounts


def _mount(args: list[str], target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    if not shutil.which("mount"):
        pytest.skip("no mount(8) on this system: cannot build a small/read-only file system for the test")
    proc = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mounting is not permitted here (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")


@contextlib.contextmanager
def tmpfs(target: Path, options: str):
    _mount(["-t", "tmpfs", "-o", options, "tmpfs"], target)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_disk_full_enospc(tmp_path):
    """A real ENOSPC: a 3 MiB tmpfs takes one converted fixture (2.4 MB) but not a second one."""
    src = fixture_copy(tmp_path / "src", side_files=True)
    before = tree_hashes(src)
    with tmpfs(tmp_path / "small", "size=3m") as small:
        out = small / "out"
        ok = run_cli("convert", src, out)
        assert ok.returncode == 0, ok.stderr
        kept = tree_hashes(out)

        # --overwrite on a full disk: I/O error, the previous OUTPUT untouched, nothing left behind
        proc = run_cli("convert", src, out, "--overwrite", "--scale-dtype", "bfloat16")
        assert proc.returncode == 5, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert "no space left on device" in proc.stderr
        assert tree_hashes(out) == kept and leftovers(out) == []

        # a fresh OUTPUT on the full disk: nothing at OUTPUT, no partial folder
        out2 = small / "out2"
        proc = run_cli("convert", src, out2)
        assert_clean_failure(proc, 5, out2, "no space left on device", str(small))
        assert sorted(p.name for p in small.iterdir()) == ["out"]
    assert tree_hashes(src) == before


def test_read_only_output_parent(tmp_path):
    src = fixture_copy(tmp_path / "src")
    before = tree_hashes(src)
    ro = tmp_path / "ro"
    if os.geteuid() != 0:  # permission bits are enough for an ordinary user
        ro.mkdir()
        ro.chmod(0o555)
        try:
            out = ro / "out"
            proc = run_cli("convert", src, out)
            assert_clean_failure(proc, 5, out, "permission denied")
        finally:
            ro.chmod(0o755)
        return
    # root ignores permission bits: use a read-only tmpfs, and remount a used one read-only
    with tmpfs(ro, "size=8m") as mnt:
        out = mnt / "out"
        assert run_cli("convert", src, out).returncode == 0
        kept = tree_hashes(out)
        r = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
        proc = run_cli("convert", src, mnt / "new")
        assert_clean_failure(proc, 5, mnt / "new", "read-only file system")
        proc = run_cli("convert", src, out, "--overwrite")
        assert proc.returncode == 5 and "read-only file system" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert tree_hashes(out) == kept
        # a missing parent on a read-only file system cannot be created either
        proc = run_cli("convert", src, mnt / "a" / "b" / "out")
        assert_clean_failure(proc, 5, mnt / "a" / "b" / "out", "read-only file system")
    assert tree_hashes(src) == before


# ------------------------------------------------------------------------------ source changes


def test_source_changed_during_run_in_process(tmp_path, monkeypatch, capsys):
    """Deterministic: the source shard grows right after the first output shard is written."""
    from gptq2xpu.cli import main
    from gptq2xpu.write import shards as writer

    src = fixture_copy(tmp_path / "src")
    out = tmp_path / "out"
    real_write = writer.ShardWriter.write
    calls = []

    def write_then_modify_source(self, shard, fd, path):
        rv = real_write(self, shard, fd, path)
        if not calls:
            with open(src / SHARD, "ab") as fh:
                fh.write(b"\0" * 8)
        calls.append(shard.name)
        return rv

    monkeypatch.setattr(writer.ShardWriter, "write", write_then_modify_source)
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(src), str(out), "--max-shard-size", "1MB", "--jobs", "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 3, err
    assert len(calls) == 1, "the change must be caught right after the shard during which it happened"
    lines = [layer for layer in err.splitlines() if layer.strip()]
    assert len(lines) == 1 and "Traceback" not in err
    assert SHARD in lines[0] and "changed during the run" in lines[0]
    assert not out.exists() and leftovers(out) == []


def test_source_touched_during_real_run(big_source, tmp_path):
    """A real run whose source shard's mtime changes while it writes: exit 3, nothing published."""
    out = tmp_path / "out"
    shard = big_source / SHARD
    st = shard.stat()
    proc = start_convert(big_source, out, "--jobs", "1")
    try:
        wait_mid_write(proc, out)
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        result = resume(proc)
    finally:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert_clean_failure(result, 3, out, SHARD, "changed during the run")


# ------------------------------------------------------------------------------ before and after the run


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_after_publishing_is_success(tmp_path, sig):
    """Once OUTPUT is published the outcome is decided: a late signal gets a warning, exit 0,
    since the exit code must say which output is at OUTPUT (the new one)."""
    src = fixture_copy(tmp_path / "src")
    out = tmp_path / "out"
    proc = run_cli("convert", src, out, faults=[("gptq2xpu.write:publish", f"after:{sig}", 1)])
    assert proc.returncode == 0, proc.stderr
    assert sig in proc.stderr and "published" in proc.stderr
    assert run_cli("verify", out).returncode == 0 and leftovers(out) == []


_SIGNAL_WHILE_IMPORTING = r"""
import os, signal, sys
class Signal:
    def find_spec(self, name, *_):
        if name == "typer":
            os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        return None
sys.meta_path.insert(0, Signal())
from gptq2xpu.__main__ import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("json_out", [False, True], ids=["text", "json"])
def test_signal_while_starting_is_one_line(tmp_path, json_out, sig):
    """Ctrl-C or SIGTERM while the command line is still being imported: exit 130, one line naming
    the signal, no traceback (and the JSON object with --json)."""
    args = ["convert", str(tmp_path / "src"), str(tmp_path / "out")] + (["--json"] if json_out else [])
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_WHILE_IMPORTING, sig, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("gptq2xpu: interrupted:") and sig in proc.stderr
    if json_out:
        assert json.loads(proc.stdout)["exit_code"] == 130
    assert not (tmp_path / "out").exists()


def test_signal_before_main_runs_is_one_line(tmp_path):
    """A signal after the entry module is imported but before its main() runs (the interpreter is
    still starting it) is kept and reported by main(): exit 130, one line."""
    script = ("import os, signal, sys; from gptq2xpu.__main__ import main; "
              "os.kill(os.getpid(), signal.SIGINT); main(sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", script, "convert", str(tmp_path / "src"), str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.splitlines() == ["gptq2xpu: interrupted: stopped by SIGINT (Ctrl-C) while starting; "
                                        "nothing was written"]


def test_ctrl_c_inside_generated_code_while_starting(tmp_path):
    """``python -m gptq2xpu`` interrupted while an import runs code made by ``exec`` (as dataclasses
    does): exit 130, not a death by SIGINT after the message (CPython's rule for a KeyboardInterrupt
    that left an exec'd string)."""
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(
        "import sys\n"
        "class Signal:\n"
        "    def find_spec(self, name, *_):\n"
        "        if name == 'typer':\n"
        "            exec('import os, signal; os.kill(os.getpid(), signal.SIGINT)')\n"
        "sys.meta_path.insert(0, Signal())\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "hook"), str(REPO),
                                                      os.environ.get("PYTHONPATH", "")]))
    env.pop("GPTQ2XPU_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "gptq2xpu", "convert", str(tmp_path / "src"), str(tmp_path / "o")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.startswith("gptq2xpu: interrupted:") and len(proc.stderr.splitlines()) == 1


_SIGNAL_WHILE_EXITING = r"""
import atexit, os, signal, sys
atexit.register(os.kill, os.getpid(), getattr(signal, sys.argv[1]))
from gptq2xpu.__main__ import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_while_exiting_keeps_the_exit_code(tmp_path, sig):
    """A signal while the interpreter shuts down after a published run: still exit 0 and nothing
    on stderr about it, since OUTPUT holds the new output."""
    src = fixture_copy(tmp_path / "src")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_WHILE_EXITING, sig, "convert", str(src), str(out), "-q"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert run_cli("verify", out).returncode == 0 and leftovers(out) == []


def test_a_signal_while_the_demo_verifies_still_stops_it(cli, monkeypatch, tmp_path):
    """The demo publishes its conversion, then verifies it: publishing decided the conversion, not
    the run, so Ctrl-C during the verification still stops it (exit 130)."""
    import gptq2xpu.verify.runner as runner

    def interrupted_verify(*_args, **_kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler raises here
        raise AssertionError("the signal was ignored")

    monkeypatch.setattr(runner, "verify", interrupted_verify)
    code, _, err = cli("demo", "--keep", tmp_path / "demo")
    assert code == 130 and "interrupted" in err, err
