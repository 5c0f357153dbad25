"""Run the 2-process CPU main job several times in a row and count the runs that end cleanly.

Each run is ``accelerate launch --config_file launch_configs/accelerate-cpu-2proc-qlora-foak.yaml
examples/train_tiny.py`` on a free port, with a time limit. A run ends one of four ways:

- ``clean``: exit status 0 within the limit;
- ``hang``: training finished (the script printed its summary) but the job was still running at the limit;
- ``exit-error``: training finished but the job exited with a non-zero status (e.g. an abort in teardown);
- ``failed``: the job ended (or was stopped) before training finished.

A stopped run's processes are ended (the launcher first, then every process it started). Not part of CI;
each run takes about 10 s with the default 3 steps on 2 CPU cores.

    .venv/bin/python scripts/repeat_main_job.py 20                # 20 runs, 3 steps each
    .venv/bin/python scripts/repeat_main_job.py 10 --steps 6 --timeout 180 --logs /tmp/runs
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "launch_configs" / "accelerate-cpu-2proc-qlora-foak.yaml"
SCRIPT = REPO / "examples" / "train_tiny.py"
DONE_MARK = "first loss "  # the summary line train_tiny.py prints after the last step


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux /proc; torchrun starts its workers in sessions of their own,
    so the launcher's process group does not hold them)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # ended meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def dump_stacks(pids: list[int], out) -> None:
    """Python and native stacks of every thread of ``pids`` (needs gdb; Python frames need the interpreter's
    gdb extension)."""
    for pid in pids:
        out.write(f"\n===== stacks of process {pid} =====\n")
        out.flush()
        cmd = ["gdb", "-p", str(pid), "-batch", "-iex", "set auto-load safe-path /",
               "-ex", "thread apply all py-bt", "-ex", "thread apply all bt 30"]  # fmt: skip
        try:
            subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            out.write(f"(no stacks: {exc})\n")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the launcher's group (torchrun passes it on to its workers), then SIGKILL to what is left."""
    tree = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    for pid in [proc.pid, *tree]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def run_once(index: int, args: argparse.Namespace, work: Path, logs: Path) -> tuple[str, float, int | None]:
    log = logs / f"run{index:03d}.log"
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        str(args.config),
        "--main_process_port",
        str(free_port()),
        str(args.script),
        "--steps",
        str(args.steps),
        "--work-dir",
        str(work),  # shared by the runs: the first saves the base model, the others load it
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FMS_ACCELERATION")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HF_HUB_OFFLINE"] = "1"
    started = time.perf_counter()
    with log.open("w") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            rc = None
            if args.stacks:
                dump_stacks(descendants(proc.pid), out)
            stop(proc)
    elapsed = time.perf_counter() - started
    trained = DONE_MARK in log.read_text(errors="replace")
    if rc == 0:
        outcome = "clean"
    elif not trained:
        outcome = "failed"
    else:
        outcome = "hang" if rc is None else "exit-error"
    return outcome, elapsed, rc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=int, nargs="?", default=20)
    parser.add_argument("--steps", type=int, default=3, help="training steps per run (train_tiny.py --steps)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one run may take")
    parser.add_argument("--config", type=Path, default=CONFIG, help="Accelerate config file")
    parser.add_argument("--script", type=Path, default=SCRIPT, help="training script (default: the main job's)")
    parser.add_argument(
        "--stacks", action="store_true", help="on a hang, write every process's stacks (gdb) to its log"
    )
    parser.add_argument("--logs", type=Path, default=None, help="folder for one log per run (default: a temp dir)")
    args = parser.parse_args()
    logs = args.logs or Path(tempfile.mkdtemp(prefix="fms_repeat_"))
    logs.mkdir(parents=True, exist_ok=True)
    work = logs / "work"
    counts: Counter[str] = Counter()
    for index in range(1, args.runs + 1):
        outcome, elapsed, rc = run_once(index, args, work, logs)
        counts[outcome] += 1
        print(f"run {index:3d}/{args.runs}: {outcome:10s} status {rc}  {elapsed:6.1f} s", flush=True)
    summary = ", ".join(f"{counts[k]} {k}" for k in ("clean", "hang", "exit-error", "failed"))
    print(f"{counts['clean']}/{args.runs} clean exits ({summary}); logs in {logs}")
    return 0 if counts["clean"] == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
