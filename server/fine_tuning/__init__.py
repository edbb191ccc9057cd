"""The OpenAI fine-tuning API's machinery: SQLite records (`records`), uploaded files (`files`),
and the job queue that runs `plait train` as a child process and publishes its adapter (`jobs`);
`service` ties them to one data directory."""
