"""`plait train` and `plait train-router`: QLoRA on the server's own NF4 base, and learned routers.

The trainer imports of the server only what both must agree on: the base-model loader
(`plait.server.base_model`), the PEFT format (`plait.server.adapters.format`), and the contract
with the fine-tuning jobs (`plait.server.fine_tuning.contract`: data formats, command line, event
lines). `cli` and `router_cli` are the commands; `data`, `masking` and `batching` turn JSONL into
batches; `model`, `loop`, `schedule` and `checkpoint` train; `report` and `publish` finish a run.
"""
