"""The OpenAI fine-tuning API's machinery, for the server's own base model.

- `contract`: what the server and `plait train` agree on (data formats and their line
  checks, the trainer's command line, a run's files, its event lines, steps per epoch); it
  imports nothing else of plait, and the trainer imports it.
- `records`: files, jobs, events and checkpoints in SQLite, as dataclasses.
- `files`: uploaded training files, checked line by line before they are kept.
- `hyperparameters`: a job's settings, checked when it is created, and how they map onto
  `plait train`.
- `trainer_process`: one `plait train` child in its own process group.
- `jobs`: the queue, and the supervisor thread that runs one job at a time and publishes
  its adapter through the function it is given.
- `service`: all of it for one data directory.

Nothing here imports the engine, the adapters or the API: adapters are published through a
function `plait serve` hands in.
"""
