#!/usr/bin/env python
"""One experiment with many clients, run twice: by the in-process trainer
(:mod:`oqfl_ext.fl.experiment`, what ``oqfl-fl`` runs) and on Flower's simulation runtime
(:mod:`oqfl_ext.fl.flower.simulate`: the package's ServerApp and ClientApp, one virtual SuperNode
per client, Ray actors): time per round and the peak memory of every process involved.

    python bench/flower_simulation.py [--clients 1000] [--fraction 0.01] [--rounds 3]
        [--train-subset all] [--cpus-per-client 1] [--save NAME]

Every other option is the experiment's default (W4A4 small CNN on 14x14 Fashion-MNIST, int4
uplink with error feedback, evaluation on the 10k test images, float and integer). Both runs use
one torch thread per process (``threads=1``, the default of both). The in-process run is a child
process (this script with ``--in-process``) so that its memory is measured the same way as the
simulation's: :class:`oqfl_ext.fl.flower.simulate.ProcessTree` samples every process of the run
(RSS and PSS summed over them, and each one's own peak RSS). Time per round: ``wall_time_s`` of
``metrics.json`` (the server's round: sending, the sampled clients' training, aggregation and
evaluation). Needs Fashion-MNIST and the ``[simulation]`` extra.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))

MiB = 2 ** 20


def _options(args) -> dict:
    return {"clients": args.clients, "fraction": args.fraction, "rounds": args.rounds,
            "train-subset": args.train_subset, "seed": args.seed, "threads": 1}


def in_process_worker(options_json: str, out: str) -> None:
    """The child of the in-process run: the experiment of ``options`` (the run config's keys),
    round by round; writes what it measured to ``out``."""
    from oqfl_ext.fl.flower.task import apply_threads, parse_run_config, run_in_process

    cfg, settings = parse_run_config(json.loads(options_json))
    apply_threads(settings)
    t0 = time.monotonic()
    server, results = run_in_process(cfg)
    Path(out).write_text(json.dumps({
        "wall_s": time.monotonic() - t0,
        "rounds": [{"round": r.round, "wall_time_s": r.wall_time_s, "accuracy": r.accuracy,
                    "sampled": len(r.sampled), "accepted": len(r.accepted)} for r in results]}))


def run_in_process_measured(options: dict, tmp: Path) -> dict:
    from oqfl_ext.fl.flower.simulate import ProcessTree

    out = tmp / "in-process.json"
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, __file__, "--in-process", json.dumps(options),
                             str(out)], cwd=ROOT)
    tree = ProcessTree(proc.pid, interval=0.5).start()
    code = proc.wait()
    tree.stop()
    if code != 0:
        raise SystemExit(f"the in-process run failed (exit {code})")
    res = json.loads(out.read_text())
    res.update(total_s=time.monotonic() - t0, memory=tree.report())
    return res


def run_simulation_measured(options: dict, tmp: Path, cpus_per_client: int) -> dict:
    from oqfl_ext.fl.flower.simulate import LocalSimulation
    from oqfl_ext.fl.metrics import load_run

    run_config = dict(options, **{"round-timeout": 3600.0, "wait-nodes-timeout": 3600.0})
    t0 = time.monotonic()
    with LocalSimulation(tmp / "sim", options["clients"], cpus_per_client=cpus_per_client,
                         memory_interval=0.5) as sim:
        t_up = time.monotonic()
        run_id = sim.submit(run_config)
        info = sim.wait(run_id, timeout=6 * 3600)
        t_done = time.monotonic()
    config, rounds = load_run(sim.out_dir)
    return {"status": info["status"], "total_s": time.monotonic() - t0,
            "superlink_start_s": t_up - t0, "run_s": t_done - t_up,
            "partition_map_s": config.get("partition_map_s"),
            "rounds": [{"round": r["round"], "wall_time_s": r["wall_time_s"],
                        "accuracy": r["accuracy"], "sampled": len(r["sampled"]),
                        "accepted": len(r["accepted"])} for r in rounds],
            "memory": sim.tree.report(), "left_behind": sim.left_behind}


def _machine() -> str:
    import oqfl_ext.ops

    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines()
                     if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "?"
    return (f"CPU: {model}, {os.cpu_count()} cores; ISA path: "
            f"{oqfl_ext.ops.cpu_capability()}; Python {platform.python_version()}")


def _mem(m: dict) -> str:
    return (f"{m['peak_rss_bytes'] / MiB:,.0f} | {m['peak_pss_bytes'] / MiB:,.0f} | "
            f"{m['sum_peak_rss_bytes'] / MiB:,.0f} | {m['processes']}")


def render(options: dict, inproc: dict, sim: dict, loads, args) -> str:
    def per_round(res):
        times = [r["wall_time_s"] for r in res["rounds"]]
        later = times[1:] or times
        return times, statistics.median(later)

    ti, mi = per_round(inproc)
    ts, ms = per_round(sim)
    acc_i, acc_s = inproc["rounds"][-1]["accuracy"], sim["rounds"][-1]["accuracy"]
    lines = [
        f"## Flower simulation runtime vs in-process trainer: {options['clients']} clients, "
        f"{sim['rounds'][0]['sampled']} sampled per round, {options['rounds']} rounds",
        "",
        f"{_machine()}; load average (1/5/15 min) before: {loads[0]}, after: {loads[1]}; "
        f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        f"Experiment: the defaults of `oqfl-fl` (W4A4 small CNN, 14x14 Fashion-MNIST, int4 uplink "
        f"with error feedback and zstd, float32 downlink, evaluation of the float and the integer "
        f"model on the 10k test images every round) with `{json.dumps(options)}`. Simulation: "
        f"`python -m oqfl_ext.fl.flower.simulate --num-supernodes {options['clients']} "
        f"--cpus-per-client {args.cpus_per_client}` (flwr 1.41.0, Ray; Ray's CPUs: all "
        f"{os.cpu_count()}, so {os.cpu_count() // args.cpus_per_client} ClientApp actors "
        f"train at once); in-process: `oqfl_ext.fl.flower.task.run_in_process` in a child "
        f"process (the clients train one after the other).",
        "",
        "| run | round times (s) | median round, rounds 1+ (s) | final accuracy | "
        "peak RSS, summed (MiB) | peak PSS, summed (MiB) | sum of per-process peak RSS (MiB) "
        "| processes |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        f"| in-process | {', '.join(f'{t:.2f}' for t in ti)} | {mi:.2f} | {acc_i:.4f} | "
        f"{_mem(inproc['memory'])} |",
        f"| Flower simulation | {', '.join(f'{t:.2f}' for t in ts)} | {ms:.2f} | {acc_s:.4f} | "
        f"{_mem(sim['memory'])} |",
        "",
        f"- Simulation / in-process: median round time {ms / mi:.2f}x, peak summed RSS "
        f"{sim['memory']['peak_rss_bytes'] / inproc['memory']['peak_rss_bytes']:.1f}x, peak "
        f"summed PSS {sim['memory']['peak_pss_bytes'] / inproc['memory']['peak_pss_bytes']:.1f}x.",
        f"- Wall time of the whole run: in-process {inproc['total_s']:.1f} s (data, partitions, "
        f"{options['clients']} clients, quantizer calibration, rounds); simulation "
        f"{sim['total_s']:.1f} s: SuperLink start {sim['superlink_start_s']:.1f} s, then "
        f"`flwr run` to `finished:completed` {sim['run_s']:.1f} s, of which the ServerApp's "
        f"partition map (waiting for the {options['clients']} virtual SuperNodes and a `query` "
        f"to each: Ray's start, the actors' imports) {sim['partition_map_s']:.1f} s.",
        f"- Simulation processes: {json.dumps(sim['memory']['process_names'])}; left running "
        f"after the SuperLink stopped (then stopped by pid): {len(sim['left_behind'])}.",
        "- RSS counts the pages shared by several processes (torch's libraries, Ray's object "
        "store) once per process; PSS splits them. Memory sampled every 0.5 s; the sum of the "
        "per-process peaks bounds the summed RSS from above, between samples too.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--in-process"]:
        in_process_worker(argv[1], argv[2])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--fraction", type=float, default=0.01)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-subset", default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpus-per-client", type=int, default=1)
    p.add_argument("--save", metavar="NAME", help="write bench/results/NAME.md and .json")
    args = p.parse_args(argv)
    options = _options(args)
    from oqfl_ext.fl.flower.task import parse_run_config

    parse_run_config(options)  # a bad option fails here, before anything runs
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        loads.append(" / ".join(f"{x:.2f}" for x in os.getloadavg()))
        inproc = run_in_process_measured(options, Path(tmp))
        print(f"in-process: {json.dumps(inproc)}", file=sys.stderr, flush=True)
        sim = run_simulation_measured(options, Path(tmp), args.cpus_per_client)
        print(f"simulation: {json.dumps(sim)}", file=sys.stderr, flush=True)
        loads.append(" / ".join(f"{x:.2f}" for x in os.getloadavg()))
    text = render(options, inproc, sim, loads, args)
    print(text)
    if args.save:
        (BENCH_DIR / "results" / f"{args.save}.md").write_text(text)
        (BENCH_DIR / "results" / f"{args.save}.json").write_text(json.dumps(
            {"options": options, "in_process": inproc, "simulation": sim, "load": loads},
            indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
