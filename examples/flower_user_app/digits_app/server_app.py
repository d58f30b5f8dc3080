"""The ServerApp: FedAvg's loop with OQFLFedAvg, which decodes, checks and averages the updates."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from oqfl_ext.fl.flower.strategy import OQFLFedAvg  # OQFL: instead of FedAvg

from .task import Net, load_data, test

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    torch.manual_seed(0)
    model = Net()
    x_test, y_test = load_data()
    # no node holds more than a third of the 1438 training examples (+1 for the remainder)
    n = cfg["min-nodes"]
    strategy = OQFLFedAvg(max_num_examples=1438 // n + 1, fraction_evaluate=0.0,
                          min_train_nodes=n, min_available_nodes=n)
    rounds = []

    def central_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = test(model, x_test, y_test)
        report = strategy.last_round if server_round > 0 else None
        rounds.append({"round": server_round, "accuracy": acc, "loss": loss,
                       "accepted": None if report is None else report.accepted,
                       "dropped": None if report is None else report.dropped,
                       "uplink_bytes": None if report is None else report.uplink_bytes})
        return MetricRecord({"accuracy": acc, "loss": loss})

    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                            num_rounds=cfg["num-server-rounds"], evaluate_fn=central_eval)
    out = Path(cfg["out-dir"])
    out.mkdir(parents=True, exist_ok=True)
    save_file(dict(result.arrays.to_torch_state_dict()), str(out / "model.safetensors"))
    (out / "rounds.json").write_text(json.dumps(rounds, indent=1))
