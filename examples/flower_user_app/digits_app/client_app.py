"""The ClientApp: the user's own training; oqfl_mod turns its reply into an OQFL int4 update."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from oqfl_ext.fl.flower.mod import oqfl_mod  # OQFL: int4 updates with error feedback

from .task import Net, load_data, test, train

app = ClientApp(mods=[oqfl_mod])  # OQFL: the only change to the app


def _data(context):
    return load_data(context.node_config["partition-id"], context.node_config["num-partitions"])


@app.train()
def fit(msg: Message, context: Context) -> Message:
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = _data(context)
    loss = train(model, x, y, context.run_config["local-epochs"], context.run_config["lr"],
                 seed=msg.content["config"]["server-round"])
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"train-loss": loss, "num-examples": len(y)})})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss, acc = test(model, *_data(context))
    metrics = MetricRecord({"eval-loss": loss, "eval-acc": acc,
                            "num-examples": len(_data(context)[1])})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
