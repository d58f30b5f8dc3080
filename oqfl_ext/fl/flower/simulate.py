"""The package's ServerApp and ClientApp on Flower's simulation runtime: N virtual SuperNodes
on this machine (Ray actors run the ClientApp), the run started with ``flwr run`` as on the
deployment engine, every process stopped at the end.

    python -m oqfl_ext.fl.flower.simulate --num-supernodes 1000 --run-dir runs/sim \\
        --run-config "rounds=3 fraction=0.01 train-subset='all'"

Needs the simulation extra (``pip install "flwr[simulation]==1.41.0"``: Ray). It starts a
SuperLink in simulation mode (``flower-superlink --simulation``, on a free port of 127.0.0.1)
and submits the run with the federation config ``num-supernodes=N`` (plus Ray's
``client-resources-num-cpus``, the CPUs each virtual client's actor takes, so
``cpus / cpus-per-client`` clients train at once); Flower gives virtual SuperNode ``i`` the
node config ``partition-id=i num-partitions=N``, so the run's ``clients`` is N. The run folder
is the one of :mod:`.local` (``flwr_home/``, ``app/``, ``logs/superlink.log`` with the
simulation's and the apps' output, ``out/``) plus ``memory.json``: the peak memory of every
process the run involved (:class:`ProcessTree`).

Every process gets the environment of :func:`.local.flower_env` (no telemetry, no update
check, no Ray usage statistics); what Ray starts (its GCS server, raylet, workers) descends
from the SuperLink, and whatever of it outlives the SuperLink is stopped by process id at the
end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .local import LocalFederation, _parse_run_config, submit_and_wait

__all__ = ["LocalSimulation", "ProcessTree", "ray_available"]


def ray_available() -> bool:
    """Whether the simulation extra (Ray) is installed (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: int) -> Optional[Tuple[int, int, str]]:
    """``(ppid, start time in clock ticks, name)`` of ``pid``, or None if it is gone or a
    zombie (dead, waiting for its parent to reap it; a container's init may never do that)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()  # state, ppid, ..., starttime (field 22)
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19]), name


def _memory(pid: int) -> Tuple[int, int, int]:
    """``(RSS, peak RSS (VmHWM), PSS)`` of ``pid`` in bytes (zeros for what cannot be read)."""
    rss = hwm = pss = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError):
        pass
    return rss, hwm, pss


class ProcessTree:
    """Every process that descends from ``root`` (a pid), sampled from ``/proc`` every
    ``interval`` seconds in a thread (Linux only).

    It records the peak over the samples of the summed RSS (``peak_rss``; pages shared by
    several processes, e.g. torch's libraries, count once per process) and of the summed PSS
    (``peak_pss``: shared pages split among their processes), and each process's own peak RSS
    (``VmHWM``): their sum (``sum_hwm``) bounds the summed RSS at any time from above, also
    between samples. A process stays known (by pid and start time, so that a reused pid is not
    taken for it) after its parent has died: :meth:`survivors` lists those still running, so
    that they can be stopped."""

    def __init__(self, root: int, interval: float = 0.5):
        self.root, self.interval = root, interval
        self.known: Dict[int, Tuple[int, str]] = {}  # pid -> (start time, name)
        self.hwm: Dict[Tuple[int, int], int] = {}
        self.peak_rss = self.peak_pss = 0
        self.peak_processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "ProcessTree":
        self._thread = threading.Thread(target=self._loop, name="process-tree", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def _alive(self, pid: int, start: int) -> bool:
        st = _stat(pid)
        return st is not None and st[1] == start

    def sample(self) -> None:
        """One look at the tree: the root's descendants and every known process still
        running."""
        children: Dict[int, List[int]] = {}
        stats = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                st = _stat(int(entry.name))
                if st is not None:
                    stats[int(entry.name)] = st
                    children.setdefault(st[0], []).append(int(entry.name))
        with self._lock:
            live = {pid for pid, (start, _) in self.known.items()
                    if pid in stats and stats[pid][1] == start}
            todo = [self.root, *live]
            while todo:
                pid = todo.pop()
                if pid in stats and pid not in live:
                    live.add(pid)
                todo.extend(c for c in children.get(pid, ()) if c not in live)
            rss_sum = pss_sum = 0
            for pid in live:
                start, name = stats[pid][1], stats[pid][2]
                self.known[pid] = (start, name)
                rss, hwm, pss = _memory(pid)
                rss_sum, pss_sum = rss_sum + rss, pss_sum + pss
                self.hwm[(pid, start)] = max(self.hwm.get((pid, start), 0), hwm, rss)
            self.samples += 1
            self.peak_rss = max(self.peak_rss, rss_sum)
            self.peak_pss = max(self.peak_pss, pss_sum)
            self.peak_processes = max(self.peak_processes, len(live))

    @property
    def sum_hwm(self) -> int:
        return sum(self.hwm.values())

    def survivors(self) -> List[int]:
        with self._lock:
            return [pid for pid, (start, _) in self.known.items() if self._alive(pid, start)]

    def stop_survivors(self, grace: float = 10.0) -> List[int]:
        """SIGTERM to every known process still running, SIGKILL to what is left after
        ``grace`` seconds; returns the pids that were still running."""
        left = [p for p in self.survivors() if p != os.getpid()]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(p in self.survivors() for p in left):
                time.sleep(0.05)
        return left

    def report(self) -> dict:
        names: Dict[str, int] = {}
        with self._lock:
            for (pid, start), hwm in self.hwm.items():
                name = self.known.get(pid, (start, "?"))[1]
                names[name] = names.get(name, 0) + 1
            return {"peak_rss_bytes": self.peak_rss, "peak_pss_bytes": self.peak_pss,
                    "sum_peak_rss_bytes": self.sum_hwm, "processes": len(self.hwm),
                    "peak_processes": self.peak_processes, "samples": self.samples,
                    "interval_s": self.interval, "process_names": names}


class LocalSimulation(LocalFederation):
    """A SuperLink in simulation mode on 127.0.0.1 and ``num_supernodes`` virtual SuperNodes
    (a context manager, as :class:`.local.LocalFederation`, whose run folder, ``flwr`` calls,
    :meth:`submit` and :meth:`wait` it shares).

    Args:
        num_supernodes: the virtual SuperNodes (``num-supernodes`` of the federation config);
            node ``i`` gets ``partition-id=i num-partitions=num_supernodes``.
        cpus_per_client: CPUs Ray reserves per ClientApp actor (Flower's default is 2).
        ray_cpus: the CPUs Ray may use (default: all of the machine's).
        memory_interval: seconds between two samples of :class:`ProcessTree`.
    """

    def __init__(self, run_dir, num_supernodes: int, *, cpus_per_client: int = 1,
                 ray_cpus: Optional[int] = None, app_dir=None, start_timeout: float = 60.0,
                 memory_interval: float = 0.5):
        for name, v in (("num_supernodes", num_supernodes), ("cpus_per_client", cpus_per_client)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} expected an integer >= 1, got {v!r}")
        if ray_cpus is not None and (isinstance(ray_cpus, bool) or not isinstance(ray_cpus, int)
                                     or ray_cpus < cpus_per_client):
            raise ValueError(f"ray_cpus expected None or an integer >= cpus_per_client "
                             f"({cpus_per_client}), got {ray_cpus!r}")
        super().__init__(run_dir, nodes=num_supernodes, app_dir=app_dir,
                         start_timeout=start_timeout)
        self.federation_config = {"num-supernodes": num_supernodes,
                                  "client-resources-num-cpus": cpus_per_client}
        if ray_cpus is not None:
            self.federation_config["init-args-num-cpus"] = ray_cpus
        self.memory_interval = memory_interval
        self.tree: Optional[ProcessTree] = None
        self.left_behind: List[int] = []

    def _superlink_args(self) -> List[str]:
        return ["--simulation"]

    def _started_superlink(self) -> None:
        self.tree = ProcessTree(self.superlink.pid, self.memory_interval).start()

    def _start_nodes(self) -> None:  # the simulation makes its own virtual SuperNodes
        pass

    def _run_args(self) -> List[str]:
        return ["--federation-config",
                " ".join(f"{k}={v}" for k, v in self.federation_config.items())]

    def stop(self, grace: float = 10.0) -> None:
        """:meth:`.local.LocalFederation.stop`, then every process of the run that outlived
        the SuperLink (Ray's, whose parents died) is stopped by its pid."""
        try:
            super().stop(grace)
        finally:
            if self.tree is not None:
                self.tree.stop()
                self.left_behind = self.tree.stop_survivors(grace)
                if self.run_dir.is_dir():
                    (self.run_dir / "memory.json").write_text(
                        json.dumps(self.tree.report(), indent=1) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m oqfl_ext.fl.flower.simulate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--num-supernodes", type=int, default=10,
                   help="virtual SuperNodes (= the run's clients)")
    p.add_argument("--run-dir", default="runs/flower-sim", help="run folder (created)")
    p.add_argument("--run-config", default="", help='overrides, e.g. "rounds=5 fraction=0.01"')
    p.add_argument("--cpus-per-client", type=int, default=1,
                   help="CPUs Ray reserves per ClientApp actor")
    p.add_argument("--ray-cpus", type=int, default=None,
                   help="CPUs Ray may use (default: all)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole run")
    p.add_argument("--app", default=None, help="run this Flower app folder instead of the "
                   "package's (its run config needs an out-dir key)")
    args = p.parse_args(argv)
    if not ray_available():
        print("the simulation runtime needs Ray: pip install \"flwr[simulation]==1.41.0\"",
              file=sys.stderr)
        return 2
    own = args.app is None
    cfg = _parse_run_config(args.run_config, check=own,
                            overrides={"clients": args.num_supernodes} if own else None)
    try:
        sim = LocalSimulation(args.run_dir, args.num_supernodes,
                              cpus_per_client=args.cpus_per_client, ray_cpus=args.ray_cpus,
                              app_dir=args.app)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    t0 = time.monotonic()
    with sim:
        print(f"simulation SuperLink on 127.0.0.1:{sim.port}, {args.num_supernodes} virtual "
              f"SuperNodes; logs in {sim.logs}", flush=True)
        run_id, info = submit_and_wait(sim, cfg, args.timeout)
    if info is None:
        return 1
    wall = time.monotonic() - t0
    mem = sim.tree.report()
    print(f"run {run_id}: {info['status']} in {wall:.1f} s; peak memory of its "
          f"{mem['processes']} processes: RSS {mem['peak_rss_bytes'] / 2**20:.0f} MiB, PSS "
          f"{mem['peak_pss_bytes'] / 2**20:.0f} MiB; results in "
          f"{cfg.get('out-dir', sim.out_dir)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
