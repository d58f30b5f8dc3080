"""Per-run metrics of a federated run: ``metrics.json`` and an accuracy plot.

Stable API (reused by the command line and the Flower app):

* :func:`save_run` ``(folder, config, rounds)`` writes ``folder/metrics.json`` and
  ``folder/accuracy.png``;
* :func:`load_run` ``(folder)`` reads ``metrics.json`` back as ``(config, rounds)``;
* :func:`plot_runs` ``(runs, path)`` draws several runs in one figure (``--compare``);
* :func:`summarize` / :func:`format_table` make the comparison table;
* :func:`cumulative_uplink_mb` and :func:`round_record` are helpers.

``metrics.json``::

    {"format": "oqfl-metrics", "version": 1,
     "config": {...},                       # whatever the caller passed (JSON-able)
     "rounds": [{"round": 0, "accuracy": 0.71, "loss": 0.83,
                 "uplink_bytes": 123456, "downlink_bytes": 234567, "total_bytes": 358023,
                 "wall_time_s": 1.25, ...}, ...],
     "traffic": {"rounds": 1, "uplink_bytes": 123456, "downlink_bytes": 234567,
                 "total_bytes": 358023, "uplink_bytes_per_round": 123456.0, ...}}

``traffic`` (:func:`traffic`) holds the run's bytes per direction and in total, summed and per
round; it is derived from ``rounds`` when the file is written (readers may ignore it).

Each round record must hold at least the keys of :data:`REQUIRED_KEYS` (``round`` and the byte
counts integers >= 0, the others numbers or ``None``); any other JSON-able keys are kept as
given (e.g. ``"accepted"``, ``"dropped"``). Non-finite floats (a NaN loss) are written as
``null`` so the file is strict JSON. ``MB`` is 10**6 bytes everywhere.
Files are written atomically (a temporary file in the same folder, fsync, rename), so a reader
never sees half a file and a killed run leaves the previous version in place.

``accuracy.png`` has two panels: test accuracy against the round, and test accuracy against the
cumulative uplink MB (after each round). Plots use matplotlib's Agg backend and never open a
window.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .._io import atomic_write_bytes

__all__ = ["REQUIRED_KEYS", "METRICS_FILE", "PLOT_FILE", "MB", "save_run", "load_run",
           "write_metrics", "plot_run", "plot_runs", "cumulative_uplink_mb", "round_record",
           "summarize", "traffic", "format_table", "atomic_write_bytes", "jsonable", "check_rounds",
           "mean_train_loss"]

REQUIRED_KEYS = ("round", "accuracy", "loss", "uplink_bytes", "downlink_bytes", "wall_time_s")
METRICS_FILE = "metrics.json"
PLOT_FILE = "accuracy.png"
MB = 1e6
_FORMAT = "oqfl-metrics"
_VERSION = 1

PathLike = Union[str, os.PathLike]
Runs = Union[Mapping[str, Sequence[Mapping[str, Any]]],
             Sequence[Tuple[str, Sequence[Mapping[str, Any]]]]]


# ----------------------------------------------------------------------------------------------
# files

def jsonable(value):
    """Plain JSON types: non-finite floats -> None, tuples -> lists, numbers from numpy/torch
    scalars -> Python numbers; anything else raises TypeError naming its type."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return jsonable(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    raise TypeError(f"metrics: value of type {type(value).__name__} is not JSON-serializable")


def check_rounds(rounds: Sequence[Mapping[str, Any]]) -> List[dict]:
    if isinstance(rounds, (str, bytes)) or not isinstance(rounds, Sequence):
        raise TypeError(f"rounds expected a list of dicts, got {type(rounds).__name__}")
    out = []
    for i, r in enumerate(rounds):
        if not isinstance(r, Mapping):
            raise TypeError(f"rounds[{i}] expected a dict, got {type(r).__name__}")
        missing = [k for k in REQUIRED_KEYS if k not in r]
        if missing:
            raise ValueError(f"rounds[{i}] is missing the key(s) {', '.join(missing)} "
                             f"(required: {', '.join(REQUIRED_KEYS)})")
        rec = jsonable(dict(r))  # numpy / torch scalars -> Python numbers
        for key in REQUIRED_KEYS:
            v = rec[key]
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            if key in _COUNT_KEYS:
                ok, expected = number and isinstance(v, int) and v >= 0, "an integer >= 0"
            else:  # None: a NaN written as null
                ok, expected = v is None or number, "a number or null"
            if not ok:
                raise ValueError(f"rounds[{i}][{key!r}] expected {expected}, got {v!r}")
        out.append(rec)
    return out


_COUNT_KEYS = ("round", "uplink_bytes", "downlink_bytes")


def write_metrics(path: PathLike, config: Mapping[str, Any],
                  rounds: Sequence[Mapping[str, Any]]) -> Path:
    """Writes the metrics JSON file (format in the module docstring) atomically; returns the
    path."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config expected a dict, got {type(config).__name__}")
    rounds = check_rounds(rounds)
    doc = {"format": _FORMAT, "version": _VERSION, "config": jsonable(dict(config)),
           "rounds": rounds, "traffic": traffic(rounds)}
    data = json.dumps(doc, indent=1, allow_nan=False).encode() + b"\n"
    atomic_write_bytes(path, data)
    return Path(path)


def save_run(folder: PathLike, config: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]],
             *, title: Optional[str] = None, plot: bool = True) -> Dict[str, Path]:
    """Writes ``folder/metrics.json`` and (with ``plot``) ``folder/accuracy.png`` for one run.

    Args:
        folder: created if missing.
        config: the run's configuration (JSON-able values).
        rounds: one dict per round with at least :data:`REQUIRED_KEYS`.
        title: the plot's title (default: ``config["name"]`` if present, else none).
        plot: False skips the PNG.

    Returns ``{"metrics": path, "plot": path}`` (``"plot"`` only when drawn).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": write_metrics(folder / METRICS_FILE, config, rounds)}
    if plot:
        if title is None and isinstance(config.get("name"), str):
            title = config["name"]
        paths["plot"] = plot_run(folder / PLOT_FILE, rounds, title=title)
    return paths


def load_run(folder_or_file: PathLike) -> Tuple[dict, List[dict]]:
    """``(config, rounds)`` read from a ``metrics.json`` (or the folder holding one)."""
    path = Path(folder_or_file)
    if path.is_dir():
        path = path / METRICS_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no metrics file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a metrics JSON file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise ValueError(f"{path}: not an {_FORMAT} file")
    if doc.get("version") != _VERSION:
        raise ValueError(f"{path}: metrics version {doc.get('version')!r}, expected {_VERSION}")
    config, rounds = doc.get("config"), doc.get("rounds")
    if not isinstance(config, dict) or not isinstance(rounds, list):
        raise ValueError(f"{path}: expected a 'config' object and a 'rounds' list")
    return config, rounds


# ----------------------------------------------------------------------------------------------
# numbers

def round_record(result, *, downlink_bytes: int, **extra) -> dict:
    """The metrics dict of a :class:`oqfl_ext.fl.RoundResult` (or any object with its
    attributes): the required keys plus ``accepted``, ``dropped`` (list of ``[id, reason]``),
    ``clipped``, ``capped``, ``not_delivered``, ``unconfirmed``, ``num_samples``,
    ``downlink_unconfirmed_bytes``, ``aggregate_rejected`` (only when set), and ``extra``
    keys."""
    rec = {"round": int(result.round), "accuracy": float(result.accuracy),
           "loss": float(result.loss), "uplink_bytes": int(result.uplink_bytes),
           "downlink_bytes": int(downlink_bytes),
           "total_bytes": int(result.uplink_bytes) + int(downlink_bytes),
           "wall_time_s": float(result.wall_time_s)}
    for key in ("sampled", "accepted", "clipped", "capped", "not_delivered", "unconfirmed"):
        if hasattr(result, key):
            rec[key] = list(getattr(result, key))
    if hasattr(result, "dropped"):
        rec["dropped"] = [[str(c), str(r)] for c, r in result.dropped]
    for key in ("num_samples", "downlink_unconfirmed_bytes"):
        if hasattr(result, key):
            rec[key] = int(getattr(result, key))
    if getattr(result, "aggregate_rejected", None) is not None:
        rec["aggregate_rejected"] = str(result.aggregate_rejected)
    rec.update(extra)
    return rec


def mean_train_loss(losses: Iterable[Tuple[Optional[float], Any]]) -> Optional[float]:
    """The sample-weighted mean of ``(training loss, num_samples)`` pairs, over the pairs
    with a float loss and a non-zero count; None when there is none."""
    kept = [(loss, n) for loss, n in losses if isinstance(loss, float) and n]
    if not kept:
        return None
    return sum(loss * n for loss, n in kept) / sum(n for _, n in kept)


def traffic(rounds: Sequence[Mapping[str, Any]]) -> dict:
    """Bytes of a run per direction and in total (``uplink_bytes``, ``downlink_bytes``,
    ``total_bytes``), summed over ``rounds`` and per round (``*_per_round``, 0.0 for none)."""
    n = len(rounds)
    up = sum(int(r["uplink_bytes"]) for r in rounds)
    down = sum(int(r["downlink_bytes"]) for r in rounds)
    out = {"rounds": n, "uplink_bytes": up, "downlink_bytes": down, "total_bytes": up + down}
    for key in ("uplink_bytes", "downlink_bytes", "total_bytes"):
        out[key + "_per_round"] = out[key] / n if n else 0.0
    return out


def cumulative_uplink_mb(rounds: Sequence[Mapping[str, Any]]) -> List[float]:
    """The uplink MB (10**6 bytes) sent up to and including each round."""
    out, total = [], 0
    for r in rounds:
        total += int(r["uplink_bytes"])
        out.append(total / MB)
    return out


def _acc(r: Mapping[str, Any]) -> float:
    a = r.get("accuracy")
    return float("nan") if a is None else float(a)


def summarize(rounds: Sequence[Mapping[str, Any]]) -> dict:
    """Totals of a run: ``rounds``, ``final_accuracy``, ``best_accuracy``, ``final_loss``,
    ``uplink_mb`` (total), ``uplink_mb_per_round``, ``downlink_mb``, ``downlink_mb_per_round``,
    ``total_mb`` (up + down), ``total_mb_per_round``,
    ``time_per_round_s`` (mean wall time), ``total_time_s``, ``final_integer_accuracy`` (the
    converted integer model's, NaN when not evaluated). Empty runs give NaNs and zeros."""
    n = len(rounds)
    accs = [_acc(r) for r in rounds]
    finite = [a for a in accs if math.isfinite(a)]
    t = traffic(rounds)
    up, down = t["uplink_bytes"] / MB, t["downlink_bytes"] / MB
    wall = sum(float(r["wall_time_s"]) for r in rounds)
    last_loss = rounds[-1].get("loss") if rounds else None
    last_int = rounds[-1].get("integer_accuracy") if rounds else None
    return {"rounds": n,
            "final_accuracy": accs[-1] if accs else float("nan"),
            "best_accuracy": max(finite) if finite else float("nan"),
            "final_loss": float("nan") if last_loss is None else float(last_loss),
            "uplink_mb": up, "uplink_mb_per_round": up / n if n else 0.0,
            "downlink_mb": down, "downlink_mb_per_round": down / n if n else 0.0,
            "total_mb": up + down, "total_mb_per_round": (up + down) / n if n else 0.0,
            "time_per_round_s": wall / n if n else 0.0, "total_time_s": wall,
            "final_integer_accuracy": float("nan") if last_int is None else float(last_int)}


def _runs_list(runs: Runs) -> List[Tuple[str, Sequence[Mapping[str, Any]]]]:
    items = list(runs.items()) if isinstance(runs, Mapping) else list(runs)
    out = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError("runs expected a {label: rounds} dict or a list of (label, rounds)")
        out.append((item[0], item[1]))
    if not out:
        raise ValueError("runs expected at least one run")
    return out


def format_table(runs: Runs, *, baseline: Optional[str] = None) -> str:
    """A plain-text comparison table, one row per run: final and best accuracy, the final
    accuracy of the converted integer model ("-" when not evaluated), uplink MB in total and per
    round, the uplink bytes ratio against ``baseline`` (default: the first run), downlink MB per
    round and mean seconds per round."""
    items = _runs_list(runs)
    sums = [(label, summarize(rounds)) for label, rounds in items]
    base_label = baseline if baseline is not None else sums[0][0]
    base = dict(sums).get(base_label)
    if base is None:
        raise ValueError(f"baseline {baseline!r} is not one of the runs")
    header = ["run", "final acc", "best acc", "integer acc", "uplink MB", "MB/round",
              "uplink ratio", "down MB/round", "s/round"]
    rows = []
    for label, s in sums:
        ratio = (f"{base['uplink_mb'] / s['uplink_mb']:.2f}x smaller" if label != base_label
                 and s["uplink_mb"] > 0 else "1.00x")
        if label != base_label and s["uplink_mb"] > 0 and s["uplink_mb"] > base["uplink_mb"]:
            ratio = f"{s['uplink_mb'] / base['uplink_mb']:.2f}x larger"
        integer = s["final_integer_accuracy"]
        rows.append([label, _pct(s["final_accuracy"]), _pct(s["best_accuracy"]),
                     _pct(integer) if math.isfinite(integer) else "-",
                     f"{s['uplink_mb']:.3f}", f"{s['uplink_mb_per_round']:.3f}", ratio,
                     f"{s['downlink_mb_per_round']:.3f}", f"{s['time_per_round_s']:.2f}"])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def _pct(a: float) -> str:
    return "n/a" if not math.isfinite(a) else f"{100 * a:.2f}%"


# ----------------------------------------------------------------------------------------------
# plots

def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def plot_runs(runs: Runs, path: PathLike, *, title: Optional[str] = None) -> Path:
    """Draws every run (``{label: rounds}`` or ``[(label, rounds), ...]``) into one PNG with two
    panels -- accuracy against round, accuracy against cumulative uplink MB (log scale when the
    runs' totals differ by more than 20x) -- written atomically to ``path``; returns it."""
    items = _runs_list(runs)
    plt = _pyplot()
    fig, (ax_r, ax_mb) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    try:
        totals = []
        for label, rounds in items:
            rounds = list(rounds)
            xs = [int(r["round"]) + 1 for r in rounds]
            accs = [100 * _acc(r) for r in rounds]
            mb = cumulative_uplink_mb(rounds)
            ax_r.plot(xs, accs, marker="o", markersize=3, label=label)
            ax_mb.plot(mb, accs, marker="o", markersize=3, label=label)
            if mb and mb[-1] > 0:
                totals.append(mb[-1])
        from matplotlib.ticker import MaxNLocator
        ax_r.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_r.set_xlabel("round (1 = after the first round)")
        ax_r.set_ylabel("test accuracy (%)")
        ax_r.set_title("accuracy vs round")
        ax_mb.set_xlabel("cumulative uplink (MB)")
        ax_mb.set_ylabel("test accuracy (%)")
        ax_mb.set_title("accuracy vs uplink traffic")
        if len(totals) > 1 and max(totals) / min(totals) > 20:
            ax_mb.set_xscale("log")
        for ax in (ax_r, ax_mb):
            ax.grid(True, alpha=0.3)
            if len(items) > 1:
                ax.legend()
        if title:
            fig.suptitle(title)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        import io
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_run(path: PathLike, rounds: Sequence[Mapping[str, Any]], *,
             title: Optional[str] = None, label: str = "run") -> Path:
    """:func:`plot_runs` for a single run."""
    return plot_runs([(label, rounds)], path, title=title)
