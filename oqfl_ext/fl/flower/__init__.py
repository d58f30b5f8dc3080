"""OQFL federations across machines on Flower (the optional extra: ``pip install .[flower]``).

* :mod:`.server_app` / :mod:`.client_app`: the Flower ServerApp and ClientApp (Message API);
  the blobs of docs/DESIGN.md section 4 travel as message content (:mod:`.wire`), aggregation and
  evaluation are :class:`oqfl_ext.fl.Server`'s own code.
* :mod:`.task`: the run config (the experiment of :mod:`oqfl_ext.fl.experiment` and the Flower
  settings), and :func:`~.task.run_in_process`, the same experiment without Flower.
* :mod:`.local`: a SuperLink and N SuperNodes on loopback, ``flwr run``, the run's status, and
  every process stopped (``python -m oqfl_ext.fl.flower.local --help``).
* :func:`write_app`: the Flower app folder (``pyproject.toml`` naming the components, with the
  run config's defaults) that ``flwr run`` packs and sends to the SuperLink.

* :mod:`.simulate`: the same apps on Flower's simulation runtime (N virtual SuperNodes in Ray
  actors on this machine; the ``flwr[simulation]`` extra), with the peak memory of every
  process involved (``python -m oqfl_ext.fl.flower.simulate --help``).

Only :mod:`.task`, :mod:`.local` and :mod:`.simulate` import without flwr (nothing of the
package imports Ray: the simulation runtime starts it). Every Flower process must run with
``FLWR_TELEMETRY_ENABLED=0``, ``FLWR_DISABLE_UPDATE_CHECK=1`` and, for the simulation's Ray,
``RAY_USAGE_STATS_ENABLED=0`` (:data:`NO_PHONE_HOME`): otherwise Flower and Ray contact their
own servers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

__all__ = ["FLWR_VERSION", "NO_PHONE_HOME", "APP_NAME", "write_app", "app_pyproject",
           "flwr_available"]

#: the Flower release this package is written and tested against (the extra pins it)
FLWR_VERSION = "1.41.0"
#: environment every Flower process of the project gets
NO_PHONE_HOME = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                 "RAY_USAGE_STATS_ENABLED": "0"}
APP_NAME = "oqfl-fl"


def flwr_available() -> bool:
    try:
        import flwr  # noqa: F401
    except ImportError:
        return False
    return True


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    import json

    return json.dumps(str(v))  # a TOML basic string


def app_pyproject() -> str:
    """The app's ``pyproject.toml``: components and the run config's defaults."""
    from .task import run_config_defaults

    defaults = run_config_defaults()
    lines = [
        "# Flower app of oqfl_ext (written by oqfl_ext.fl.flower.write_app; the code is the",
        "# installed oqfl_ext package, which every SuperLink and SuperNode machine needs).",
        "[build-system]",
        'requires = ["setuptools>=64"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        f'name = "{APP_NAME}"',
        'version = "0.1.0"',
        'description = "OQFL: learnable low-bit quantized federated training (oqfl_ext)"',
        'license = "Apache-2.0"',
        f'dependencies = ["flwr=={FLWR_VERSION}", "oqfl_ext"]',
        "",
        "[tool.flwr.app]",
        'publisher = "oqfl"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "oqfl_ext.fl.flower.server_app:app"',
        'clientapp = "oqfl_ext.fl.flower.client_app:app"',
        "",
        "# the run config (override with: flwr run APP CONNECTION --run-config \"k=v ...\");",
        "# meanings: `oqfl-fl --help` (the same options without --) and oqfl_ext/fl/flower/task.py",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{k} = {_toml_value(v)}" for k, v in defaults.items()]
    return "\n".join(lines) + "\n"


def write_app(folder: Union[str, Path]) -> Path:
    """Writes the Flower app folder (just its ``pyproject.toml``) and returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(app_pyproject())
    return folder
