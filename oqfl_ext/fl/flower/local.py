"""A Flower federation on this machine: a SuperLink and N SuperNodes on loopback, as separate
processes of Flower's deployment engine, the run started with ``flwr run``, its status polled,
and every process stopped at the end whatever happens.

    python -m oqfl_ext.fl.flower.local --nodes 3 --run-dir runs/flower \\
        --run-config "rounds=3 train-subset=3000"

The run folder holds ``flwr_home/`` (FLWR_HOME of every process: Flower's config.toml with the
``oqfl-local`` connection, installed app bundles), ``app/`` (the app folder),
``logs/{superlink,supernode-I,flwr-*,run-RUN}.log`` and ``out/`` (metrics.json, accuracy.png,
model.safetensors). Every process gets ``FLWR_HOME`` and :data:`NO_PHONE_HOME`
(``FLWR_TELEMETRY_ENABLED=0``, ``FLWR_DISABLE_UPDATE_CHECK=1``, ``RAY_USAGE_STATS_ENABLED=0``),
so nothing contacts Flower's (or Ray's) servers; the SuperLink runs with
``--disable-runtime-dependency-installation`` (it would otherwise try to install the app's
dependencies for each run) and everything with ``--insecure`` on 127.0.0.1 only.

``flwr run`` returns when the run is submitted (and exits 0 even if the ServerApp then fails):
the outcome is the run's status, ``finished:completed`` on success (``flwr ls --run-id``).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import NO_PHONE_HOME, write_app

__all__ = ["LocalFederation", "RunFailed", "free_port", "flower_env", "group_alive",
           "submit_and_wait"]

CONNECTION = "oqfl-local"


class RunFailed(RuntimeError):
    """The Flower run did not finish with status ``finished:completed``."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (flwr, flower-superlink, ...)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def flower_env(flwr_home: Path, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of every Flower process: FLWR_HOME, no telemetry, no update check, no
    Ray usage statistics, this interpreter's bin folder first on PATH (the SuperLink and
    SuperNodes start ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by
    name)."""
    env = dict(os.environ)
    env.update(NO_PHONE_HOME)
    env["FLWR_HOME"] = str(flwr_home)
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if extra:
        env.update(extra)
    return env


def _wait_port(port: int, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{what} did not open port {port} within {timeout:g} s")


def _stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the process group (the process and the children it started), then SIGKILL
    after ``grace`` seconds; always waits for the process itself."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # the group may outlive its leader (a ServerApp / ClientApp subprocess): kill what is left
    # and wait until the group is gone
    deadline = time.monotonic() + 10
    while True:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            break
        proc.poll()  # reap the leader once it is dead (a zombie still counts in the group)
        if time.monotonic() > deadline:  # pragma: no cover - a process stuck in the kernel
            break
        time.sleep(0.05)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass


def group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` is left."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalFederation:
    """A SuperLink and ``nodes`` SuperNodes on 127.0.0.1 (a context manager: leaving it stops
    every process it started, process group by process group, SIGTERM then SIGKILL).

    Args:
        run_dir: the run folder (created); see the module docstring.
        nodes: number of SuperNodes; node ``i`` gets ``partition-id=i
            num-partitions=nodes``.
        node_env: extra environment per node index (e.g. fault injection).
        app_dir: a Flower app folder to run instead of the package's own app (which is
            written to ``run_dir/app``), e.g. a user's app using :mod:`.mod` and
            :mod:`.strategy`; its run config must have an ``out-dir`` key (:meth:`submit`
            sets it).
    """

    def __init__(self, run_dir, nodes: int = 3, node_env: Optional[Dict[int, Dict]] = None,
                 start_timeout: float = 60.0, app_dir=None):
        if nodes < 1:
            raise ValueError(f"nodes expected >= 1, got {nodes}")
        self.run_dir = Path(run_dir).resolve()
        self.nodes = nodes
        self.node_env = node_env or {}
        self.start_timeout = start_timeout
        self.flwr_home = self.run_dir / "flwr_home"
        self.logs = self.run_dir / "logs"
        self.own_app = app_dir is None
        self.app_dir = self.run_dir / "app" if app_dir is None else Path(app_dir).resolve()
        if not self.own_app and not (self.app_dir / "pyproject.toml").is_file():
            raise ValueError(f"app_dir expected a Flower app folder (with pyproject.toml), got "
                             f"{app_dir}")
        self.out_dir = self.run_dir / "out"
        self.superlink: Optional[subprocess.Popen] = None
        self.supernodes: List[Optional[subprocess.Popen]] = []
        self.port: Optional[int] = None
        self._files = []
        self.envs: Dict[int, Dict[str, str]] = {}  # pid -> the environment it was started with
        self._old_sigterm = None

    # -------------------------------------------------------------- processes

    def _spawn(self, args: List[str], log_name: str, env: Dict[str, str]) -> subprocess.Popen:
        log = open(self.logs / log_name, "ab")
        self._files.append(log)
        log.write(("$ " + shlex.join(args) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=self.run_dir,
                                start_new_session=True)  # its own process group
        self.envs[proc.pid] = env
        return proc

    def start(self) -> "LocalFederation":
        for d in (self.flwr_home, self.logs, self.out_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self.own_app:
            write_app(self.app_dir)
        env = flower_env(self.flwr_home)
        atexit.register(self.stop)
        self._trap_sigterm()
        try:
            self.port = free_port()
            self._write_connection()
            self.superlink = self._spawn(
                [_bin("flower-superlink"), "--insecure",
                 "--disable-runtime-dependency-installation",
                 "--host", "127.0.0.1", "--port", str(self.port), *self._superlink_args()],
                "superlink.log", env)
            self._started_superlink()
            _wait_port(self.port, self.superlink, self.start_timeout, "flower-superlink")
            self._start_nodes()
        except BaseException:
            self.stop()
            raise
        return self

    # hooks of a federation of another kind (.simulate: no SuperNodes, a simulation run)
    def _superlink_args(self) -> List[str]:
        return []

    def _started_superlink(self) -> None:
        pass

    def _start_nodes(self) -> None:
        for i in range(self.nodes):
            self.supernodes.append(self._start_node(i))

    def _run_args(self) -> List[str]:
        """Arguments of ``flwr run`` besides the app, the connection and the run config."""
        return []

    def _start_node(self, i: int) -> subprocess.Popen:
        env = flower_env(self.flwr_home, {k: str(v) for k, v in
                                          self.node_env.get(i, {}).items()})
        return self._spawn(
            [_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
             "--node-config", f"partition-id={i} num-partitions={self.nodes}",
             "--host", "127.0.0.1", "--port", str(free_port())], f"supernode-{i}.log", env)

    def _write_connection(self) -> None:
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')

    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Sends ``sig`` to SuperNode ``i``'s process group (it and its ClientApp)."""
        proc = self.supernodes[i]
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=30)

    def _trap_sigterm(self) -> None:
        """While the federation runs, SIGTERM to this process raises SystemExit (in the main
        thread, when nobody else handles SIGTERM), so that the finally blocks and context
        managers that stop the processes run (the default action would kill this process
        and leave the Flower processes behind)."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return

        def on_sigterm(signum, frame):
            raise SystemExit(128 + signum)

        self._old_sigterm = signal.signal(signal.SIGTERM, on_sigterm)

    def stop(self, grace: float = 10.0) -> None:
        """Stops every process started here, whatever state they are in: SIGTERM to every
        SuperNode's process group (they unregister), then to the SuperLink's, each followed by
        SIGKILL for what is left after ``grace`` seconds. Safe to call more than once."""
        if self._old_sigterm is not None and \
                threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
        atexit.unregister(self.stop)
        errors = []
        nodes = [p for p in self.supernodes if p is not None]
        for batch in (nodes, [self.superlink] if self.superlink is not None else []):
            for proc in batch:  # signal the whole batch first, then wait
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            for proc in batch:
                try:
                    _stop(proc, grace)
                except Exception as e:  # keep stopping the others
                    errors.append(e)
        for f in self._files:
            f.close()
        self._files = []
        if errors:
            raise errors[0]

    def __enter__(self) -> "LocalFederation":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -------------------------------------------------------------- flwr CLI

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Runs ``flwr ARGS`` with the federation's environment (output logged)."""
        cmd = [_bin("flwr"), *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             env=flower_env(self.flwr_home, {"COLUMNS": "200"}),
                             cwd=self.run_dir, stdin=subprocess.DEVNULL)
        with open(self.logs / f"flwr-{args[0]}.log", "a") as log:
            log.write(f"$ {shlex.join(cmd)}\n[exit {res.returncode}]\n{res.stdout}{res.stderr}\n")
        return res

    @staticmethod
    def _json(res: subprocess.CompletedProcess, what: str) -> dict:
        text = res.stdout
        start = text.find("{")
        while start != -1:
            try:
                obj, _ = json.JSONDecoder().raw_decode(text[start:])
                if isinstance(obj, dict):
                    return obj
            except ValueError:
                pass
            start = text.find("{", start + 1)
        raise RuntimeError(f"{what}: no JSON in the output (exit {res.returncode}):\n"
                           f"{res.stdout}\n{res.stderr}")

    def submit(self, run_config: Optional[Dict] = None) -> int:
        """``flwr run`` of the app with ``run_config`` overrides; returns the run id
        (the run goes on in the background)."""
        cfg = dict(run_config or {})
        cfg.setdefault("out-dir", str(self.out_dir))
        args = ["run", str(self.app_dir), CONNECTION, "--format", "json", *self._run_args()]
        if cfg:
            args += ["--run-config", " ".join(f"{k}={_toml(v)}" for k, v in cfg.items())]
        res = self.flwr(*args)
        payload = self._json(res, "flwr run")
        if res.returncode != 0 or not payload.get("success") or payload.get("run-id") is None:
            raise RunFailed(f"flwr run failed (exit {res.returncode}): {payload}")
        return int(payload["run-id"])

    def run_info(self, run_id: int) -> dict:
        """The run's row of ``flwr ls --run-id RUN --format json`` (status, network traffic)."""
        res = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        payload = self._json(res, "flwr ls")
        runs = [r for r in payload.get("runs", []) if str(r.get("run-id")) == str(run_id)]
        if res.returncode != 0 or not runs:
            raise RuntimeError(f"flwr ls: run {run_id} not found: {payload}")
        return runs[0]

    def wait(self, run_id: int, timeout: float = 900.0, poll: float = 1.0,
             check: bool = True) -> dict:
        """Polls the run until its status is ``finished:*``; returns its :meth:`run_info`.
        With ``check``, a status other than ``finished:completed`` raises :class:`RunFailed`
        (with the ends of the logs). On timeout the run is stopped (``flwr stop``)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.run_info(run_id)
            status = str(info.get("status", ""))
            if status.startswith("finished"):
                break
            if self.superlink is not None and self.superlink.poll() is not None:
                raise RunFailed(f"the SuperLink exited (code {self.superlink.returncode}) "
                                f"during run {run_id}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.flwr("stop", str(run_id), CONNECTION)
                raise RunFailed(f"run {run_id} not finished after {timeout:g} s (status "
                                f"{status}); stopped\n{self.log_tail()}")
            time.sleep(poll)
        self.save_run_log(run_id)
        if check and status != "finished:completed":
            raise RunFailed(f"run {run_id} ended with status {status} "
                            f"({info.get('status-details')})\n{self.log_tail()}")
        return info

    def save_run_log(self, run_id: int) -> Path:
        """Writes the run's log as the SuperLink keeps it (the ServerApp's output, and on the
        simulation runtime the ClientApps' too: ``flwr log RUN --show``) to
        ``logs/run-RUN.log``."""
        path = self.logs / f"run-{run_id}.log"
        try:
            res = self.flwr("log", str(run_id), CONNECTION, "--show")
            path.write_text(res.stdout + res.stderr)
        except (OSError, subprocess.SubprocessError) as e:  # a log is no reason to fail
            path.write_text(f"flwr log failed: {e}\n")
        return path

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for path in sorted(self.logs.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name} (last {lines} lines)\n" + "\n".join(text))
        return "\n".join(out)


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def _parse_run_config(text: str, check: bool = True,
                      overrides: Optional[Dict[str, object]] = None) -> Dict[str, object]:
    """``"k=v k2='x'"`` (TOML values) into a dict, updated with ``overrides`` (what the
    launcher sets, e.g. ``clients``), with ``check`` checked as the package's apps check the run
    config."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib

    from .task import parse_run_config

    out = {}
    for item in shlex.split(text or ""):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--run-config: expected key=value, got {item!r}")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value  # a bare string
    out.update(overrides or {})
    if not check:
        return out
    try:
        parse_run_config(out)  # fail here, before starting anything
    except ValueError as e:
        raise SystemExit(f"--run-config: {e}") from None
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m oqfl_ext.fl.flower.local",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=3, help="SuperNodes (= the run's clients)")
    p.add_argument("--run-dir", default="runs/flower", help="run folder (created)")
    p.add_argument("--run-config", default="", help='overrides, e.g. "rounds=5 seed=1"')
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole run")
    p.add_argument("--app", default=None, help="run this Flower app folder instead of the "
                   "package's (its run config needs an out-dir key)")
    args = p.parse_args(argv)
    own = args.app is None
    cfg = _parse_run_config(args.run_config, check=own,
                            overrides={"clients": args.nodes} if own else None)
    with LocalFederation(args.run_dir, nodes=args.nodes, app_dir=args.app) as fed:
        print(f"SuperLink on 127.0.0.1:{fed.port}, {args.nodes} SuperNodes; logs in {fed.logs}",
              flush=True)
        run_id, info = submit_and_wait(fed, cfg, args.timeout)
        if info is None:
            return 1
        traffic = info.get("network-traffic", {})
        print(f"run {run_id}: {info['status']}; traffic in {traffic.get('inbound-bytes')} B, "
              f"out {traffic.get('outbound-bytes')} B; results in "
              f"{cfg.get('out-dir', fed.out_dir)}", flush=True)
    return 0


def submit_and_wait(fed: LocalFederation, cfg: Dict, timeout: float):
    """The launchers' run: ``(run id, run info)``, the info None when the run did not finish
    with ``finished:completed`` (said on stderr)."""
    run_id = fed.submit(cfg)
    print(f"run {run_id} started", flush=True)
    try:
        return run_id, fed.wait(run_id, timeout=timeout)
    except RunFailed as e:
        print(e, file=sys.stderr)
        return run_id, None


if __name__ == "__main__":
    sys.exit(main())
