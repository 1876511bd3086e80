"""run_h_pylori.sh under a real SLURM: a one-node cluster on localhost, started for this module and torn down after.

What only a real scheduler exercises: the #SBATCH header (--requeue, --open-mode=append, --signal=B:USR1@120),
the spool copy of the script (code found through SLURM_SUBMIT_DIR), `scancel --signal=USR1 --batch` reaching the
batch shell, train.py's `scontrol requeue`, the TERM SLURM sends while requeueing, and the requeued job resuming.

Needs root (slurmd runs jobs as their owner) and Debian's slurmctld, slurmd, munge and slurm-client, which
`make test` installs where missing. The daemons get their own munge key and socket, ports, state and spool
folders under tmp_path, so a real cluster config on the machine is never read; every process they start carries
a marker in its environment, and teardown kills every process that has it."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from helico import ledger

SCRIPT = ROOT / "run_h_pylori.sh"
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
NEEDED = ("munged", "mungekey", "slurmctld", "slurmd", "slurmstepd", "sbatch", "scontrol", "scancel", "sinfo")
MARKER = "HELICO_SLURM_TEST_CLUSTER"  # in the environment of every daemon and job this module starts
CLEARED = ("HELICO_DATA", "PYTHON", "RUNS_DIR", "STAGE_DIR", "STAGE_RESERVE_MB", "STAGE_LOCK_TIMEOUT", "EVAL_ARGS",
           "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "SRUN_CPUS_PER_TASK", "CACHE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float, every: float = 0.5, logs=()):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    tails = "\n".join(f"--- {p}:\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


class Cluster:
    """munged + slurmctld + slurmd for one node of 2 CPUs, all configured under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]  # slurmd looks itself up by its short host name
        self.procs: list[subprocess.Popen] = []
        for sub in ("munge", "state", "spool", "log"):
            (root / sub).mkdir(parents=True)
        (root / "munge").chmod(0o700)  # munged refuses a key or socket folder others can write to
        self.socket = root / "munge" / "munge.socket"
        assert len(str(self.socket)) < 100, f"{self.socket}: too long for a unix socket (use a shorter --basetemp)"
        self.conf = root / "slurm.conf"
        self.conf.write_text(self.config())
        self.env = {k: v for k, v in os.environ.items() if k not in CLEARED and not k.startswith("SLURM_")}
        self.env.update(SLURM_CONF=str(self.conf), PATH=SBIN_PATH, **{MARKER: str(root)})
        self.logs = [root / "log" / name for name in ("munged.log", "slurmctld.log", "slurmd.log", "daemons.out")]

    def config(self) -> str:
        r = self.root
        return f"""ClusterName=helico-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={self.socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
KillWait=30
NodeName={self.host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=2048 State=UNKNOWN
PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""

    def start(self):
        key = self.root / "munge" / "munge.key"
        self.run("mungekey", "--create", f"--keyfile={key}")
        out = open(self.root / "log" / "daemons.out", "ab")
        spawn = lambda *cmd: self.procs.append(subprocess.Popen(  # noqa: E731
            cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        spawn("munged", "--foreground", "--force", f"--socket={self.socket}", f"--key-file={key}",
              f"--pid-file={self.root}/munged.pid", f"--log-file={self.root}/log/munged.log",
              f"--seed-file={self.root}/munge/seed")
        wait_for("munged's socket", self.socket.exists, 20, logs=self.logs)
        spawn("slurmctld", "-D", "-i", "-f", str(self.conf))  # -i: ignore state from an earlier session
        spawn("slurmd", "-D", "-f", str(self.conf))
        wait_for("the node to be idle", lambda: self.alive() and
                 self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle", 60, logs=self.logs)

    def alive(self) -> bool:
        dead = [p.args[0] for p in self.procs if p.poll() is not None]
        if dead:
            pytest.fail(f"{', '.join(dead)} exited during start-up\n" +
                        "\n".join(f"--- {p}:\n{p.read_text(errors='replace')[-3000:]}" for p in self.logs if p.exists()))
        return True

    def run(self, *cmd, check=True, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL, **kw)
        assert not check or r.returncode == 0, f"{' '.join(cmd)}: {r.stderr}"
        return r

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict ({} once the job is gone)."""
        r = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        return dict(f.split("=", 1) for f in r.stdout.split() if "=" in f) if r.returncode == 0 else {}

    def stop(self):
        """Cancel every job, stop the daemons, then kill whatever still carries the marker (job steps included)."""
        if self.procs and self.procs[-1].poll() is None:
            # again and again: train.py answers scancel's TERM by checkpointing and requeueing its job
            deadline = time.time() + 40  # KillWait=30: SLURM's own TERM-then-KILL of the job's processes
            while time.time() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                self.run("scancel", "--user", "root", check=False)
                time.sleep(1)
        for p in reversed(self.procs):  # slurmd, slurmctld, then munged (they need it to talk while stopping)
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=15)
        for pid in marked_processes(str(self.root)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        left = wait_for_none_marked(str(self.root))
        assert not left, f"processes of the test cluster outlived it: {left}"


def marked_processes(root: str) -> list[int]:
    """Live processes whose environment holds MARKER=root: the daemons, slurmstepd, the jobs and their children."""
    needle, found = f"{MARKER}={root}\0".encode(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes() and "Z" not in (entry / "stat").read_text().split()[2]:
                found.append(int(entry.name))
        except OSError:  # exited meanwhile, or not ours to read
            continue
    return found


def wait_for_none_marked(root: str, timeout: float = 10) -> list[int]:
    deadline = time.time() + timeout
    while (left := marked_processes(root)) and time.time() < deadline:
        time.sleep(0.2)
    return left


def why_no_cluster() -> str | None:
    missing = [c for c in NEEDED if shutil.which(c, path=SBIN_PATH) is None]
    if missing:
        return (f"SLURM launcher test not run: {', '.join(missing)} not installed (Debian: apt-get install slurmctld "
                "slurmd munge slurm-client; `make test` does it)")
    if os.geteuid() != 0:
        return "SLURM launcher test not run: slurmd must run as root to start jobs (run the tests as root, as CI does)"
    return None


@pytest.fixture
def demo_root(small_demo_root):
    """The job copies, stages, audits, caches and trains on it: the 12-patient demo serves."""
    return small_demo_root


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = why_no_cluster()
    if reason:
        pytest.skip(reason)
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def test_a_job_stages_trains_checkpoints_on_usr1_requeues_resumes_and_evaluates(cluster, demo_root, tmp_path):
    shared, work = tmp_path / "shared" / "HelicoDataSet", tmp_path / "work"
    shutil.copytree(demo_root, shared)
    (work / "runs").mkdir(parents=True)
    env = {**cluster.env, "HELICO_DATA": str(shared), "TMPDIR": str(tmp_path / "node-local"), "PYTHON": sys.executable,
           "CACHE": "off", "EVAL_ARGS": "--gradcam 0 --bootstrap 0",
           # 1 thread: on 2 cores shared with other work, 2 OpenMP threads spin-wait and run 5-10x slower
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    (tmp_path / "node-local").mkdir()
    # sbatch from the repository (SLURM_SUBMIT_DIR is where the spooled script finds train.py); the job itself runs
    # in `work`, so runs/ and the log stay out of the repository. The #SBATCH header gives --requeue, the USR1
    # warning and --open-mode=append; the command line overrides its GPU, CPU and memory requests.
    r = cluster.run("sbatch", "--parsable", "--gres=none", "--cpus-per-task=2", "--mem=1G", f"--chdir={work}",
                    f"--output={work}/runs/slurm-%j.out", str(SCRIPT), "--run-id", "x", "--device", "cpu",
                    "--weights", "none", "--image-size", "64", "--batch-size", "16", "--epochs", "1",
                    "--limit-samples", "32", "--workers", "2", "--seed", "0",
                    "--no-patient-model", env=env, cwd=ROOT)  # the patient model step: test_launcher's help example
    job = r.stdout.strip().split(";")[0]
    run, log = work / "runs" / "x", work / "runs" / f"slurm-{job}.out"
    logs = [log, *cluster.logs]

    # config.json is written once train.py's signal handlers are in place; the first epoch is still running
    wait_for("training to start", lambda: (run / "config.json").exists() or cluster.job(job).get("JobState") not in
             ("PENDING", "RUNNING", None), 120, every=0.2, logs=logs)
    assert cluster.job(job)["JobState"] == "RUNNING", log.read_text()[-3000:]
    cluster.run("scancel", "--signal=USR1", "--batch", job)

    # train.py saves last.pt and runs `scontrol requeue`; SLURM then holds the job for ~2 min (BeginTime) before
    # starting it again: start it now instead, the one liberty this test takes with the scheduler.
    wait_for("the requeue", lambda: cluster.job(job).get("Restarts") == "1" and
             cluster.job(job).get("JobState") == "PENDING", 90, logs=logs)
    assert (run / "last.pt").is_file()
    # Not at once: the requeue revoked the job's credential on the node, and slurmd compares whole seconds, so an
    # allocation within the same second gets a credential it counts as revoked ("Killing non-startable batch JobId=1:
    # Job credential revoked" in slurmctld.log, an empty log after the requeue, state FAILED). That is what SLURM's
    # own BeginTime delay avoids; under load the old instance's clean-up also finishes later. Wait for the node to
    # be idle again (the first instance is gone), then past the revocation's second.
    wait_for("the node to be idle after the requeue", lambda: cluster.run(
        "sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle", 60, logs=logs)
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    state = wait_for("the requeued job to finish", lambda: cluster.job(job).get("JobState") in
                     ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
                     and cluster.job(job), 150, every=1, logs=logs)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", text[-4000:]

    first, second = text.split("(restart 1)", 1)  # --open-mode=append: both runs in one log
    expected_first = ["staging: copying", "audit: checking", "USR1 received: asking training",
                      "stopped by signal", f"requeued SLURM job {job}",  # train.py's own line
                      f"job {job} was requeued", "resumes from last.pt by itself"]
    expected_second = ["reusing verified copy", "x: resuming after epoch 0 step",  # mid-epoch
                       "evaluate:", "done: runs/x", "staged copy kept on", "--clean-stage"]
    assert [e for e in expected_first if e not in first] == [], text[-6000:]
    assert [e for e in expected_second if e not in second] == [], text[-6000:]
    assert "patient model:" not in text  # --no-patient-model, read by the launcher itself (not passed to train.py)
    assert "GPUs: 0 (none allocated or visible: CPU run)" in text and "GPUs: 1" not in text
    assert "run the same command to resume" not in text and "submit the same command again" not in text
    assert (run / "eval" / "metrics.json").is_file()


def test_an_array_of_folds_ends_with_one_job_that_pools_them_and_evaluates_the_ensemble(cluster, demo_root, tmp_path):
    """sbatch --array=0-1 run_h_pylori.sh --run-id 27 --folds 2: each task trains and evaluates its fold; the first
    submits, once, a job that waits for the whole array and writes runs/27-cv/ and runs/27-ensemble/, one look each."""
    shared, work = tmp_path / "shared" / "HelicoDataSet", tmp_path / "work"
    shutil.copytree(demo_root, shared)
    (work / "runs").mkdir(parents=True)
    (tmp_path / "node-local").mkdir()
    env = {**cluster.env, "HELICO_DATA": str(shared), "TMPDIR": str(tmp_path / "node-local"), "PYTHON": sys.executable,
           "CACHE": "off", "EVAL_ARGS": "--gradcam 0 --bootstrap 0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = cluster.run("sbatch", "--parsable", "--array=0-1", "--gres=none", "--cpus-per-task=1", "--mem=900M",
                    f"--chdir={work}", f"--output={work}/runs/slurm-%A_%a.out", str(SCRIPT), "--run-id", "27",
                    "--folds", "2", "--device", "cpu", "--weights", "none", "--image-size", "32", "--batch-size", "16",
                    "--epochs", "1", "--limit-samples", "32", "--workers", "0", "--seed", "0", "--no-patient-model",
                    env=env, cwd=ROOT)
    array = r.stdout.strip().split(";")[0]
    runs = work / "runs"
    logs = [runs / f"slurm-{array}_{i}.out" for i in (0, 1)] + cluster.logs
    marker = runs / "27-cv.job"
    wait_for("the finishing job's submission", marker.exists, 180, every=0.5, logs=logs)
    submitted_by, finish = marker.read_text().split()
    assert submitted_by == array
    assert cluster.job(finish).get("Dependency", "").startswith(f"afterok:{array}"), cluster.job(finish)
    logs.insert(0, runs / f"slurm-{finish}.out")
    state = wait_for("the finishing job to end", lambda: cluster.job(finish).get("JobState") in
                     ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY") and cluster.job(finish), 600,
                     every=2, logs=logs)
    text = (runs / f"slurm-{finish}.out").read_text()
    assert state["JobState"] == "COMPLETED", text[-4000:]
    assert "done: runs/27-cv, runs/27-ensemble" in text
    assert (runs / "27-cv" / "report.md").is_file() and (runs / "27-ensemble" / "report.md").is_file()
    entries = ledger.read(runs / ledger.NAME)
    kinds = sorted(e["kind"] for e in entries)
    assert kinds == ["cv", "ensemble", "evaluate", "evaluate"] and not any(e.get("repeat_of") for e in entries)
