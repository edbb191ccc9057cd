"""The HTTP API: OpenAI's routes (chat, completions, models, files, fine-tuning jobs) and Plait's
own (adapters, fusions, vLLM's load/unload routes), plus /health and /metrics.

- `app` builds the FastAPI application and limits request bodies by the bytes read.
- `context.ServerContext` is what every route shares; `served` turns a request's `model` or
  `adapters` into engine keys and routers, holding the adapter versions it uses.
- `generation`, `adapters`, `fusions`, `files`, `fine_tuning` are the routes; `protocol`
  the request bodies, validated strictly.
- `errors` answers every `plait.server.errors.ClientError` in OpenAI's error shape; `schema`
  makes the OpenAPI document list the error statuses each route returns.
"""
