"""ClientApp: local LoRA training; fastlora.flower.client_update does the wire work."""
from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fastlora.flower import client_update, load_global

from fastlora_app import task


def _node(context: Context):
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


def make_client_app(**overrides) -> ClientApp:
    """The ClientApp; ``overrides`` win over the run config (see make_server_app)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = task.config(context.run_config, overrides)
        partition, num_partitions = _node(context)
        tokens, parts, _ = task.get_data(cfg, num_partitions)
        server_round = int(next(iter(msg.content.config_records.values()))["server-round"])
        return client_update(msg, context, task.get_model(cfg),
                             lambda model: task.train(model, tokens, parts[partition], cfg, server_round, partition))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg = task.config(context.run_config, overrides)
        partition, num_partitions = _node(context)
        tokens, parts, _ = task.get_data(cfg, num_partitions)
        model = task.get_model(cfg)
        load_global(msg, model)
        acc, loss = task.test(model, tokens, parts[partition], cfg)
        n = min(int(cfg["eval-samples"]), int(parts[partition].numel()))
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": n, "accuracy": acc, "loss": loss})}),
                       reply_to=msg)

    return app


app = make_client_app()
