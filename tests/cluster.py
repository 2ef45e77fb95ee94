"""System pieces some tests need: Debian packages (installed when missing and we are root), a real single-node
Slurm (munge + slurmctld + slurmd on loopback, own ports and state folder), and headless Chromium."""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def ensure_packages(binaries: dict[str, str]) -> None:
    """{binary: Debian package}: install the packages of missing binaries with apt-get (root only)."""
    missing = sorted({pkg for binary, pkg in binaries.items() if shutil.which(binary) is None})
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(f"this test needs the Debian package(s) {', '.join(missing)}: apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, capture_output=True)


def _munge_works() -> bool:
    enc = subprocess.run(["munge", "-n"], capture_output=True, check=False)
    return enc.returncode == 0 and subprocess.run(["unmunge"], input=enc.stdout, capture_output=True,
                                                  check=False).returncode == 0


def start_munge() -> None:
    if _munge_works():
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run(["mungekey", "--create"], check=True)
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge", "/etc/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force"], check=True)
    for _ in range(50):
        if _munge_works():
            return
        time.sleep(0.1)
    pytest.fail("munged did not start")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(folder: Path) -> str:
    host = socket.gethostname()
    cpus = os.cpu_count() or 1
    return "\n".join([
        "ClusterName=probe-test", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        f"StateSaveLocation={folder}/state", f"SlurmdSpoolDir={folder}/spool",
        f"SlurmctldPidFile={folder}/slurmctld.pid", f"SlurmdPidFile={folder}/slurmd.pid",
        f"SlurmctldLogFile={folder}/slurmctld.log", f"SlurmdLogFile={folder}/slurmd.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory", "SchedulerType=sched/backfill", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "MpiDefault=none", "ReturnToService=2",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN",
        "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""])


class Slurm:
    """A single-node Slurm for one test session; `env` points clients (sbatch, squeue) at it."""

    def __init__(self, folder: Path):
        ensure_packages({"sbatch": "slurm-client", "slurmctld": "slurmctld", "slurmd": "slurmd",
                         "munged": "munge"})
        if os.geteuid() != 0:
            pytest.fail("the Slurm test runs slurmctld and slurmd as root (SlurmUser=root)")
        start_munge()
        self.folder = folder
        for d in ("state", "spool"):
            (folder / d).mkdir(parents=True, exist_ok=True)
        self.conf = folder / "slurm.conf"
        self.conf.write_text(slurm_conf(folder))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        subprocess.run(["slurmctld", "-i", "-f", str(self.conf)], check=True, env=self.env)
        subprocess.run(["slurmd", "-f", str(self.conf)], check=True, env=self.env)
        for _ in range(100):
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env,
                                 check=False).stdout.strip()
            if out == "idle":
                return
            time.sleep(0.2)
        logs = "".join(p.read_text()[-2000:] for p in folder.glob("*.log"))
        self.stop()
        pytest.fail(f"Slurm did not come up (sinfo: {out!r}):\n{logs}")

    def stop(self) -> None:
        subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True, check=False)
        for pid_file in ("slurmd.pid", "slurmctld.pid"):
            pid = self.folder / pid_file
            if pid.exists():
                try:
                    os.kill(int(pid.read_text()), 15)
                except (ProcessLookupError, ValueError):
                    pass


def chromium() -> str:
    ensure_packages({"chromium": "chromium"})
    return shutil.which("chromium")
