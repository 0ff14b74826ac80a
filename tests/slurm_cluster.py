"""A throw-away single-node SLURM cluster (Debian slurmctld + slurmd + munge) for the end-to-end test.

Spool, logs and pid files live under one directory. slurm.conf and gres.conf must be at /etc/slurm (the jobstep
plugin strips SLURM_CONF from the environment of the nested srun); any files there are put back by `stop`.
Munge uses its standard socket.
The node pretends to be a Leonardo booster node (4 fake GPUs, 32 cores, 480 GB: `SlurmdParameters=config_overrides`
lets slurmd believe the config instead of the hardware) with the two partitions the profile names, so the
leonardo profile's real resource requests are submitted unchanged. Recipe: ../shared/notes/slurm-single-node.md.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]

SLURM_CONF = """\
ClusterName=persona_em_test
SlurmctldHost={host}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmdSpoolDir={root}/spool/slurmd
StateSaveLocation={root}/spool/slurmctld
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MpiDefault=none
SlurmUser=root
KillWait=30
MinJobAge=600
NodeName={host} CPUs=32 RealMemory=491520 Gres=gpu:4 State=UNKNOWN
PartitionName=boost_usr_prod Nodes={host} Default=YES MaxTime=INFINITE State=UP
PartitionName=lrd_all_serial Nodes={host} MaxTime=INFINITE State=UP
"""


def missing_reason() -> str | None:
    """Why this machine cannot host the test cluster, or None if it can (root and apt-get, or SLURM already there)."""
    if os.geteuid() != 0:
        return "needs root to install and start slurmctld/slurmd/munge (CI runs as root)"
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install it"
    return None


def install() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-q", *PACKAGES], check=True, env=env, capture_output=True)


class Cluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.etc = Path("/etc/slurm")
        self.conf = self.etc / "slurm.conf"
        self.env = dict(os.environ)
        self.saved: dict[Path, bytes | None] = {}
        self.pids: list[int] = []
        self.started_munged = False

    def start(self, timeout: float = 60.0) -> None:
        for sub in ("spool/slurmd", "spool/slurmctld", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.etc.mkdir(parents=True, exist_ok=True)
        for name in ("slurm.conf", "gres.conf"):
            path = self.etc / name
            self.saved[path] = path.read_bytes() if path.exists() else None
        self.conf.write_text(SLURM_CONF.format(host=self.host, root=self.root))
        for i in range(4):  # SLURM wants one device file per GPU; /dev/null clones are enough
            dev = Path(f"/dev/fakegpu{i}")
            if not dev.exists():
                os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))
        (self.etc / "gres.conf").write_text(f"NodeName={self.host} Name=gpu File=/dev/fakegpu[0-3]\n")
        self._start_munge()
        subprocess.run(["slurmctld"], check=True, env=self.env)
        self.pids.append(self._pid("slurmctld"))
        subprocess.run(["slurmd"], check=True, env=self.env)
        self.pids.append(self._pid("slurmd"))
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.run("sinfo", "-h", "-N", "-o", "%t").stdout.split()
            if state and all(s == "idle" for s in state):
                return
            if any(s in ("inval", "drain", "down", "drng", "down*") for s in state):
                self.run("scontrol", "update", f"nodename={self.host}", "state=resume")
            time.sleep(1)
        raise RuntimeError(f"SLURM node not idle after {timeout}s: {self.logs()}")

    def _start_munge(self) -> None:
        if subprocess.run(["sh", "-c", "munge -n | unmunge"], capture_output=True).returncode == 0:
            return  # a munged is already running (not ours: leave it alone)
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged", "--force"], check=True)
        self.started_munged = True
        pidfile = Path("/run/munge/munged.pid")
        for _ in range(50):
            if pidfile.exists():
                self.pids.append(int(pidfile.read_text()))
                return
            time.sleep(0.1)

    def _pid(self, daemon: str) -> int:
        pidfile = self.root / f"{daemon}.pid"
        for _ in range(100):
            if pidfile.exists() and pidfile.read_text().strip():
                return int(pidfile.read_text())
            time.sleep(0.1)
        raise RuntimeError(f"{daemon} wrote no pid file: {self.logs()}")

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True)

    def jobs(self) -> list[dict]:
        """Every job slurmctld still remembers (MinJobAge=600 s), oldest first."""
        fmt = "%i|%j|%T|%l|%P|%b|%k"
        out = self.run("squeue", "-h", "-t", "all", "-o", fmt).stdout
        keys = ["id", "name", "state", "time_limit", "partition", "gres", "comment"]
        rows = [dict(zip(keys, line.split("|"))) for line in out.splitlines() if line.strip()]
        return sorted(rows, key=lambda r: int(r["id"]))

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in (self.root / "log").glob("*.log"))

    def stop(self) -> None:
        """Stop the daemons this object started, by pid (never by name)."""
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in self.pids:
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
        self.pids.clear()
        for path, content in self.saved.items():
            if content is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(content)
