"""No orphans: when the launcher or torchrun dies, however it dies, every rank ends within 10 s.

Each test tags the processes it starts with a unique environment variable, finds them through
/proc/<pid>/environ, and SIGKILLs whatever is left at the end, so a failure leaves nothing behind.
The target scripts import only `compactfusion_xdit.reliability.orphans` (no torch, no xfuser),
except the one end-to-end launch of the real ``xfuser`` launcher with tiny-flux.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux: /proc and PR_SET_PDEATHSIG")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MARK = "CFX_ORPHAN_TEST"
DEADLINE = 10.0  # seconds from the kill to the last process of the job gone (the requirement)
START = 90.0  # seconds for torchrun and two light ranks to come up on a busy 2-core machine

RANK_SCRIPT = """\
import os, pathlib, sys, time
if sys.argv[2] == "helper":
    from compactfusion_xdit.reliability.orphans import exit_with_parent
    assert exit_with_parent()
pathlib.Path(sys.argv[1], "rank" + os.environ["RANK"]).write_text(str(os.getpid()))
time.sleep(600)
"""

LAUNCHER_CODE = ("import sys; from compactfusion_xdit.cli import plan, ports, torchrun; "
                 "launch = plan.LaunchPlan(2, 2, 1, 0, '127.0.0.1', ports.free_port()); "
                 "sys.exit(torchrun.run_to_completion(torchrun.torchrun_command(launch, sys.argv[2:], "
                 "target=(sys.argv[1],)), torchrun.launch_env(False)))")


# --------------------------------------------------------------------------------------------
# Finding a job's processes
# --------------------------------------------------------------------------------------------


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # gone, a zombie, or not ours
        return b""


def job_processes(marker: str) -> dict[int, str]:
    """{pid: command line} of the live processes whose environment carries `marker` (zombies excluded)."""
    tag = f"{MARK}={marker}".encode()
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        if tag in _read(f"/proc/{name}/environ").split(b"\0"):
            stat = _read(f"/proc/{name}/stat")
            if stat and stat[stat.rindex(b")") + 2:][:1] in (b"Z", b"X"):
                continue
            found[int(name)] = _read(f"/proc/{name}/cmdline").replace(b"\0", b" ").decode(errors="replace")
    return found


def wait_until(predicate, timeout: float, step: float = 0.1):
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > end:
            return value
        time.sleep(step)


def gone_within(marker: str, timeout: float) -> tuple[dict[int, str], float]:
    """Wait for the job to be gone; return (what is left, seconds waited)."""
    t0 = time.monotonic()
    left = job_processes(marker)
    while left and time.monotonic() - t0 < timeout:
        time.sleep(0.1)
        left = job_processes(marker)
    return left, time.monotonic() - t0


@pytest.fixture
def marker():
    """A unique tag for this test's processes; whatever still carries it at the end is SIGKILLed."""
    tag = uuid.uuid4().hex
    yield tag
    for pid in job_processes(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def tagged_env(marker: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, MARK: marker, "OMP_NUM_THREADS": "1", **extra}
    for name in ("TORCHELASTIC_RUN_ID", "CFX_LAUNCHER_PID"):
        if name not in extra:
            env.pop(name, None)
    return env


def start_launch(tmp_path, marker: str, helper: bool) -> subprocess.Popen:
    """The launcher (run_to_completion) running torchrun with two ranks; returns once both ranks run."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    log = open(tmp_path / "launch.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER_CODE, str(script), str(tmp_path),
                             "helper" if helper else "bare"], cwd=REPO, env=tagged_env(marker),
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    ready = wait_until(lambda: len(rank_pids(tmp_path)) == 2 or proc.poll() is not None, START)
    assert ready and proc.poll() is None, (tmp_path / "launch.log").read_text()[-3000:]
    return proc


def rank_pids(tmp_path) -> list[int]:
    """The pids the ranks wrote once running."""
    files = [tmp_path / f"rank{r}" for r in (0, 1)]
    return [int(f.read_text()) for f in files if f.exists() and f.read_text().isdigit()]


def torchrun_pid(marker: str) -> int:
    (pid,) = [pid for pid, cmd in job_processes(marker).items() if "torch.distributed.run" in cmd]
    return pid


# --------------------------------------------------------------------------------------------
# The launcher dies
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("helper", [True, False], ids=["ranks-with-helper", "ranks-without-helper"])
def test_sigkilled_launcher_leaves_no_torchrun_and_no_rank(tmp_path, marker, helper):
    # Without the rank helper it is torchrun's parent-death SIGTERM alone that stops the ranks.
    proc = start_launch(tmp_path, marker, helper)
    job = job_processes(marker)
    assert set(rank_pids(tmp_path)) < set(job) and torchrun_pid(marker) in job, job
    assert len(job) == 4, job  # the launcher, torchrun, two ranks
    proc.kill()
    proc.wait()
    left, waited = gone_within(marker, DEADLINE)
    assert not left, f"still running {waited:.1f} s after the launcher's SIGKILL: {left}"
    print(f"job gone {waited:.2f} s after the launcher's SIGKILL")


@pytest.mark.timeout(180)
def test_sigkilled_torchrun_leaves_no_rank_and_the_launcher_reports_it(tmp_path, marker):
    proc = start_launch(tmp_path, marker, helper=True)
    os.kill(torchrun_pid(marker), signal.SIGKILL)
    left, waited = gone_within(marker, DEADLINE)  # the launcher too: it returns when torchrun is gone
    assert not left, f"still running {waited:.1f} s after torchrun's SIGKILL: {left}"
    assert proc.wait(timeout=5) == 128 + signal.SIGKILL
    print(f"ranks gone {waited:.2f} s after torchrun's SIGKILL")


def test_a_rank_that_fails_still_stops_the_launch(tmp_path, marker):
    # torchrun's own rule (one failed rank stops the others) is unchanged by the parent-death signal.
    script = tmp_path / "rank.py"
    script.write_text("import os, sys, time\n"
                      "from compactfusion_xdit.reliability.orphans import exit_with_parent\n"
                      "exit_with_parent()\n"
                      "if os.environ['RANK'] == '1':\n    sys.exit(3)\n"
                      "time.sleep(600)\n")
    proc = subprocess.run([sys.executable, "-c", LAUNCHER_CODE, str(script)], cwd=REPO, env=tagged_env(marker),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert not job_processes(marker)


# --------------------------------------------------------------------------------------------
# The rank helper on its own
# --------------------------------------------------------------------------------------------

PARENT_CODE = """\
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]])
time.sleep(600)
"""

CHILD_CODE = """\
import os, pathlib, signal, sys, time
from compactfusion_xdit.reliability.orphans import exit_with_parent
assert exit_with_parent(poll_s=0.2, grace_s=1.0)
if sys.argv[2] == "ignore-sigterm":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
pathlib.Path(sys.argv[1]).write_text(str(os.getpid()))
time.sleep(600)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["default", "ignore-sigterm"])
def test_a_child_ends_when_its_parent_is_sigkilled(tmp_path, marker, mode):
    # "ignore-sigterm": the kernel's SIGTERM is ignored, so the watchdog thread's SIGKILL must end it.
    ready = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", PARENT_CODE, CHILD_CODE, str(ready), mode], cwd=REPO,
                              env=tagged_env(marker, TORCHELASTIC_RUN_ID="orphans-test"))
    assert wait_until(ready.exists, 30), "the child never started"
    child = int(ready.read_text())
    assert child in job_processes(marker)
    parent.kill()
    parent.wait()
    left, waited = gone_within(marker, DEADLINE)
    assert not left, f"still running {waited:.1f} s after the parent's SIGKILL: {left}"
    print(f"child gone {waited:.2f} s after its parent's SIGKILL ({mode})")


def run_child(code: str, marker: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=tagged_env(marker, **env),
                          capture_output=True, text=True, timeout=30)


def test_a_child_whose_parent_is_already_gone_exits_at_once(marker):
    # The race: the parent died before the helper ran. An explicit parent that is not ours ...
    code = ("from compactfusion_xdit.reliability.orphans import exit_with_parent\n"
            "exit_with_parent(parent=1 if __import__('os').getppid() != 1 else 2)\nprint('still here')")
    proc = run_child(code, marker)
    assert (proc.returncode, proc.stdout) == (1, "")
    # ... or, under torchrun from our launcher, a parent whose parent is not the launcher.
    code = "from compactfusion_xdit.reliability.orphans import exit_with_parent\nexit_with_parent()\nprint('still here')"
    proc = run_child(code, marker, TORCHELASTIC_RUN_ID="orphans-test", CFX_LAUNCHER_PID="999999999")
    assert (proc.returncode, proc.stdout) == (1, "")


def test_the_helper_arms_under_torchrun_only_and_hides_the_launcher_pid(marker):
    code = ("import os, threading\nfrom compactfusion_xdit.reliability.orphans import exit_with_parent\n"
            "armed = exit_with_parent()\n"
            "print(armed, threading.active_count(), os.environ.get('CFX_LAUNCHER_PID'))")
    assert run_child(code, marker).stdout.split() == ["False", "1", "None"]  # from a shell: never tied to it
    # Started by "the launcher" directly (its parent is the launcher pid): armed, and the pid is not passed on.
    code = code.replace("armed = exit_with_parent()",
                        "os.environ['CFX_LAUNCHER_PID'] = str(os.getppid()); armed = exit_with_parent()")
    assert run_child(code, marker, TORCHELASTIC_RUN_ID="orphans-test").stdout.split() == ["True", "2", "None"]


# --------------------------------------------------------------------------------------------
# The real launcher with the tiny model
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_sigkilled_xfuser_launch_leaves_nothing(tmp_path, marker):
    from compactfusion_xdit.models import tiny

    cache = tmp_path / "cache"
    tiny.materialize("tiny-flux", cache_dir=str(cache))
    log_path = tmp_path / "launch.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "compactfusion_xdit.cli.launcher", "--model", "tiny-flux",
                                 "--ulysses_degree", "2", "--height", "64", "--width", "64",
                                 "--num_inference_steps", "4000", "--prompt", "a cat",
                                 "--output_dir", str(tmp_path / "out")],
                                cwd=REPO, env=tagged_env(marker, CFX_CACHE=str(cache)), stdout=log,
                                stderr=subprocess.STDOUT)
    # Killed while the ranks denoise (both ranks imported xfuser, joined the group, loaded the model).
    denoising = wait_until(lambda: b"denoising" in log_path.read_bytes() or proc.poll() is not None, 240, 0.2)
    assert denoising and proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
    job = job_processes(marker)
    ranks = [pid for pid, cmd in job.items() if "torch.distributed.run" not in cmd and "rank.worker" in cmd]
    assert len(ranks) == 2 and torchrun_pid(marker) in job, job
    proc.kill()
    proc.wait()
    left, waited = gone_within(marker, DEADLINE)
    assert not left, f"still running {waited:.1f} s after the launcher's SIGKILL: {left}"
    print(f"xfuser job gone {waited:.2f} s after the launcher's SIGKILL")


def test_sweep_removes_the_temp_files_of_dead_processes_only(tmp_path, monkeypatch):
    """What a launcher kept in the temp folder (`temp_path`) outlives a kill -9; the next start's
    `sweep_temp` removes it, and leaves a live process's files and unrelated names alone."""
    import tempfile

    from compactfusion_xdit.reliability import orphans

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"cfx-x-{dead.pid}.json").write_text("{}")
    (tmp_path / f"cfx-x-{dead.pid}-abc").mkdir()
    (tmp_path / f"cfx-x-{dead.pid}-abc" / "rank0.log").write_text("log")
    live = orphans.temp_path("cfx-x-", ".json")
    open(live, "w").close()
    (tmp_path / "cfx-x-other").write_text("")
    (tmp_path / f"cfx-y-{dead.pid}.json").write_text("")
    removed = orphans.sweep_temp("cfx-x-")
    assert sorted(removed) == sorted([str(tmp_path / f"cfx-x-{dead.pid}.json"), str(tmp_path / f"cfx-x-{dead.pid}-abc")])
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(live), "cfx-x-other", f"cfx-y-{dead.pid}.json"])
