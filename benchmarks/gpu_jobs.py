"""Run a list of GPU jobs on one machine, packing them onto its GPUs: each job gets the number of GPUs
it asks for (through CUDA_VISIBLE_DEVICES) as soon as that many are free, in file order. Lines of
`---` are barriers: the next phase starts once every job before it has ended. Each job has its own
time limit and log; a deadline for the whole list stops new jobs and kills late ones, so a call on
a time-limited machine still returns its results.

Jobs file, one job per line:   <gpus> <name> <timeout_s> <shell command…>   (# comments, --- barriers)
$OUT in a command is the output folder.

    python benchmarks/gpu_jobs.py benchmarks/jobs/multi_gpu.txt --deadline 560 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Job:
    gpus: int
    name: str
    timeout_s: float
    command: str
    devices: list[int] = field(default_factory=list)
    start_s: float | None = None
    end_s: float | None = None
    rc: int | None = None
    note: str = ""


def parse(text: str) -> list[list[Job]]:
    phases: list[list[Job]] = [[]]
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line == "---":
            phases.append([])
            continue
        parts = line.split(maxsplit=3)
        if len(parts) < 4:
            raise SystemExit(f"line {number}: want '<gpus> <name> <timeout_s> <command>', got {line!r}")
        phases[-1].append(Job(int(parts[0]), parts[1], float(parts[2]), parts[3]))
    return [p for p in phases if p]


class Runner:
    def __init__(self, num_gpus: int, out: Path, deadline_s: float):
        self.num_gpus = num_gpus
        self.free = list(range(num_gpus))
        self.out = out
        self.t0 = time.monotonic()
        self.deadline = self.t0 + deadline_s
        self.running: dict[str, tuple[Job, subprocess.Popen]] = {}
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def run_phase(self, jobs: list[Job]) -> None:
        pending = list(jobs)
        while pending or self.running:
            while pending and pending[0].gpus <= len(self.free) and time.monotonic() < self.deadline:
                self._start(pending.pop(0))
            if pending and time.monotonic() >= self.deadline:
                for job in pending:
                    job.note = "not started: deadline"
                    print(f"[{self.now():6.0f}s] skip  {job.name}: deadline", flush=True)
                pending = []
            if pending and pending[0].gpus > self.num_gpus:
                job = pending.pop(0)
                job.note = "not started: needs more GPUs than the machine has"
                print(f"[{self.now():6.0f}s] skip  {job.name}: needs {job.gpus} GPUs", flush=True)
            self._reap()
            time.sleep(0.5)

    def _start(self, job: Job) -> None:
        job.devices, self.free = self.free[:job.gpus], self.free[job.gpus:]
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(map(str, job.devices)), JOB_NAME=job.name,
                   OUT=str(self.out))
        log = open(self.out / "logs" / f"{job.name}.log", "w")  # noqa: SIM115 (closed with the process)
        job.start_s = self.now()
        print(f"[{job.start_s:6.0f}s] start {job.name} on GPUs {job.devices}", flush=True)
        proc = subprocess.Popen(["bash", "-c", job.command], stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        log.close()
        self.running[job.name] = (job, proc)

    def _reap(self) -> None:
        for name, (job, proc) in list(self.running.items()):
            late = self.now() - job.start_s > job.timeout_s or time.monotonic() >= self.deadline
            if proc.poll() is None and late:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                _kill_descendants(job.name)
                job.note = "killed: " + ("job timeout" if self.now() - job.start_s > job.timeout_s else "deadline")
            if proc.poll() is None:
                continue
            job.rc, job.end_s = proc.returncode, self.now()
            self.free = sorted(self.free + job.devices)
            del self.running[name]
            status = "ok" if job.rc == 0 else f"FAILED rc={job.rc} {job.note}"
            print(f"[{job.end_s:6.0f}s] end   {job.name} ({job.end_s - job.start_s:.0f}s) {status}", flush=True)
            if job.rc != 0:
                tail = (self.out / "logs" / f"{job.name}.log").read_text(errors="replace").splitlines()[-8:]
                print("        " + "\n        ".join(tail), flush=True)


def _kill_descendants(name: str) -> None:
    """Kill what a killed job left behind in other sessions (a server it launched keeps its GPU
    memory otherwise): every process that inherited the job's JOB_NAME."""
    marker = f"JOB_NAME={name}".encode()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                os.kill(int(environ.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jobs", type=Path)
    p.add_argument("--gpus", type=int, default=None, help="default: every GPU torch sees")
    p.add_argument("--deadline", type=float, default=570.0, help="seconds for the whole list")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    p.add_argument("--only", default=None, help="comma-separated job names to run (default: all)")
    args = p.parse_args()
    if args.gpus is None:
        import torch

        args.gpus = torch.cuda.device_count()
    phases = parse(args.jobs.read_text())
    if args.only:
        keep = set(args.only.split(","))
        phases = [[j for j in phase if j.name in keep] for phase in phases]
    runner = Runner(args.gpus, args.out, args.deadline)
    for phase in phases:
        runner.run_phase(phase)
    jobs = [j for phase in phases for j in phase]
    (args.out / "jobs.json").write_text(json.dumps([asdict(j) for j in jobs], indent=1) + "\n")
    print(f"\n{'job':<24} {'gpus':>4} {'start':>6} {'secs':>5}  result")
    for j in jobs:
        secs = f"{j.end_s - j.start_s:.0f}" if j.end_s is not None else "-"
        result = "ok" if j.rc == 0 else (f"rc={j.rc} {j.note}" if j.rc is not None else j.note)
        print(f"{j.name:<24} {j.gpus:>4} {j.start_s or 0:>6.0f} {secs:>5}  {result}")


if __name__ == "__main__":
    main()
