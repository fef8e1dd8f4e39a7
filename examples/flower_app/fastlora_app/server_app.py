"""ServerApp: fastlora's SparseLoRA strategy (sparse payloads both ways) on the demo task."""
from __future__ import annotations

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fastlora.fl.model import set_adapter
from fastlora.flower import SparseLoRA, initial_arrays

from fastlora_app import task


def make_server_app(**overrides) -> ServerApp:
    """The ServerApp; ``overrides`` (run-config keys, e.g. ``output=...``) win over the run
    config, for engines that pass none (``flwr.simulation.run_simulation``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = task.config(context.run_config, overrides)
        model = task.get_model(cfg)
        tokens, _, test_idx = task.get_data(cfg, int(cfg["min-nodes"]))

        def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            set_adapter(model, dict(arrays.to_torch_state_dict()))
            acc, loss = task.test(model, tokens, test_idx, cfg)
            return MetricRecord({"accuracy": acc, "loss": loss})

        strategy = SparseLoRA(cfg["strategy"], fraction_train=1.0, min_train_nodes=int(cfg["min-nodes"]),
                              min_available_nodes=int(cfg["min-nodes"]))
        result = strategy.start(grid=grid, initial_arrays=initial_arrays(task.initial_adapter(cfg)),
                                num_rounds=int(cfg["num-server-rounds"]), evaluate_fn=central_evaluate)
        if cfg["output"]:
            task.save_output(cfg["output"], strategy.global_adapter, {
                "bytes": strategy.tracker.summary(),
                "train_metrics": {int(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
                "eval_metrics": {int(r): dict(m) for r, m in result.evaluate_metrics_serverapp.items()},
                "config": cfg})

    return app


app = make_server_app()
