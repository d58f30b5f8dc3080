"""Choose the quantizers' defaults on a validation split (never the test set).

Every candidate is the README's first run (``oqfl-fl --compare``'s setting: small CNN on
Fashion-MNIST, 10 clients, 10 rounds, the defaults otherwise) with one set of quantizer options,
evaluated on the last 10000 training images (``--eval-split validation``; training uses the
first 20000 of the others, as the test-set run does), for the seeds given. The score of a run is
its validation accuracy averaged over the last 3 rounds. Results go to a JSON file, one entry
per (candidate, seed), written after every run, so an interrupted sweep continues where it
stopped::

    python experiments/choose_defaults.py --candidates base,init-lsq --seeds 0,1,2 \\
        --out experiments/defaults_validation.json --jobs 2
    python experiments/choose_defaults.py --report experiments/defaults_validation.json

The candidates set quantizer options explicitly (nothing depends on the current defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the configuration before this sweep: MSE init, 8-bit edge layers, step-size lr x1, N_s of the
# input quantizers counting the whole batch
BASE = dict(quant_init="mse", first_last_bits=8, step_size_lr_scale=1.0, act_grad_count="all")
FP32 = dict(weight_bits=None, act_bits=None, uplink="float32")
CANDIDATES: Dict[str, dict] = {
    "fp32": FP32,
    "base": BASE,
    "init-lsq": dict(BASE, quant_init="lsq"),
    "edge-4": dict(BASE, first_last_bits=4),
    "edge-float": dict(BASE, first_last_bits=None),
    "step-lr-0.1": dict(BASE, step_size_lr_scale=0.1),
    "grad-example": dict(BASE, act_grad_count="example"),
    "lsq-float": dict(BASE, quant_init="lsq", first_last_bits=None),
    "lsq-lr-0.1": dict(BASE, quant_init="lsq", step_size_lr_scale=0.1),
}
LAST = 3  # rounds averaged


def _run(name: str, seed: int) -> dict:
    import torch
    torch.set_num_threads(1)
    from oqfl_ext.fl import experiment as ex
    from oqfl_ext.fl.cli import run_experiment
    cfg = ex.ExperimentConfig(eval_split="validation", seed=seed, eval_integer=False,
                              **CANDIDATES[name])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        records, _ = run_experiment(cfg, Path(tmp) / "run", progress=False)
    acc = [r["accuracy"] for r in records]
    return dict(candidate=name, seed=seed, options=CANDIDATES[name], accuracy=acc,
                score=sum(acc[-LAST:]) / LAST, seconds=time.perf_counter() - t0)


def report(results: list) -> str:
    by: Dict[str, dict] = {}
    for r in results:
        by.setdefault(r["candidate"], {})[r["seed"]] = r["score"]
    fp = by.get("fp32", {})
    seeds = sorted({r["seed"] for r in results})
    lines = ["| candidate | " + " | ".join(f"seed {s}" for s in seeds) +
             " | mean | vs FP32 (same seeds) |", "|---|" + "---:|" * (len(seeds) + 2)]
    for name in CANDIDATES:
        if name not in by:
            continue
        sc = by[name]
        cells = [f"{100 * sc[s]:.2f}" if s in sc else "" for s in seeds]
        mean = sum(sc.values()) / len(sc)
        common = [s for s in sc if s in fp]
        gap = "" if not common or name == "fp32" else \
            f"{100 * sum(sc[s] - fp[s] for s in common) / len(common):+.2f}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * mean:.2f} | {gap} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=str(ROOT / "experiments" / "defaults_validation.json"),
                   help="results file (JSON), read first: finished runs are skipped")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--report", metavar="JSON[,JSON...]",
                   help="print the table of one or more results files")
    args = p.parse_args(argv)
    if args.report:
        print(report([r for f in args.report.split(",")
                      for r in json.loads(Path(f).read_text())["runs"]]))
        return 0
    names = args.candidates.split(",")
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        p.error(f"--candidates: unknown {unknown}; expected some of {list(CANDIDATES)}")
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {"runs": []}
    done = {(r["candidate"], r["seed"]) for r in doc["runs"]}
    todo = [(n, int(s)) for s in args.seeds.split(",") for n in names if (n, int(s)) not in done]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(_run, n, s) for n, s in todo]
        for f in as_completed(futures):
            r = f.result()
            doc["runs"].append(r)
            doc["runs"].sort(key=lambda r: (list(CANDIDATES).index(r["candidate"]), r["seed"]))
            out.write_text(json.dumps(doc, indent=1) + "\n")
            print(f"{r['candidate']} seed {r['seed']}: {100 * r['score']:.2f} "
                  f"({r['seconds']:.0f} s)", flush=True)
    print(report(doc["runs"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
