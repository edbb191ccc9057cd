"""What every route needs: the engine, the tokenizer, the stores, the served names and the keys.

One `ServerContext` per server, made by `plait serve` and shared by every HTTP worker. Its
parts guard themselves (the stores and the router cache have locks, the engine takes
requests through its inbox); the context adds only the steps that must touch several of them
in order, such as storing an adapter and then telling the engine and the router cache to
forget its old versions.
"""

from __future__ import annotations

import hmac
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from plait.server.adapters.base_identity import base_model_warning
from plait.server.adapters.format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter
from plait.server.adapters.fusions import FusionStore
from plait.server.adapters.routers import RouterCache
from plait.server.adapters.store import AdapterStore, InvalidAdapterId, StoredAdapter
from plait.server.adapters.uploads import files_from_folder
from plait.server.api.chat_format import ChatFormat
from plait.server.api.structured import Grammars
from plait.server.engine import Engine
from plait.server.errors import ClientError, Conflict, NotFound
from plait.server.fine_tuning.service import FineTuning
from plait.server.metrics import Metrics

log = logging.getLogger("plait.server")


@dataclass
class ServerContext:
    engine: Engine
    tokenizer: object
    model_name: str
    metrics: Metrics
    store: AdapterStore
    fusions: FusionStore
    routers: RouterCache
    lora_targets: dict[str, tuple[int, int]]
    max_lora_rank: int
    api_key: str | None = None
    admin_key: str | None = None
    default_max_tokens: int = 1024
    max_n: int = 8  # choices one request may ask for
    model_type: str | None = None  # the base model's config.model_type, which decides how tools are shown
    base_identities: frozenset[str] = frozenset()  # the served model's (see adapters.base_identity)
    fine_tuning: FineTuning | None = None  # files and fine-tuning jobs (plait.server.fine_tuning)
    poll_seconds: float = 5.0  # how often to catch up with adapters and fusions other replicas changed
    created: int = field(default_factory=lambda: int(time.time()))
    # Characters a single token can stand for, at most: a text longer than the context times
    # this cannot fit, which is found without tokenizing it.
    max_token_chars: int = field(init=False)
    grammars: Grammars = field(init=False)
    chat_format: ChatFormat = field(init=False)
    _token_texts: dict[int, str] = field(default_factory=dict, repr=False)
    _stop_polling: threading.Event = field(default_factory=threading.Event, repr=False)

    def __post_init__(self) -> None:
        self.max_token_chars = max(len(token) for token in self.tokenizer.get_vocab())
        self.grammars = Grammars(self.tokenizer, self.engine.vocab_size)
        self.chat_format = ChatFormat(self.tokenizer, self.model_type)
        self.store.watch(self._forget)
        self.fusions.watch(self.routers.forget_fusion)

    def start(self) -> None:
        """What runs beside the requests: catching up with the shared store, and (on a `--train`
        replica) the fine-tuning queue, which first stops trainers a killed server left."""
        self._start_polling()
        if self.fine_tuning is not None:
            self.fine_tuning.start()

    def stop(self, drain_seconds: float) -> None:
        """Stop those (a running trainer is killed and its job goes back to the queue), then let the
        requests in flight finish, up to `drain_seconds`, and end the engine."""
        self._stop_polling.set()
        if self.fine_tuning is not None:
            self.fine_tuning.stop()
        self.engine.shutdown(drain_seconds)

    def _start_polling(self) -> None:
        """Catch up with the shared store every `poll_seconds` on a thread of its own: adapters and
        fusions replaced or deleted through another replica free their slots and routers here too."""

        def poll() -> None:
            while not self._stop_polling.wait(self.poll_seconds):
                try:
                    self.store.refresh()
                    self.fusions.refresh()
                except Exception as exc:  # the store is unreachable for now: serve what is known, try again
                    log.warning("catching up with the shared store failed: %s", exc)

        self._stop_polling.clear()
        threading.Thread(target=poll, name="plait-store-poll", daemon=True).start()

    def stored_adapter(self, adapter_id: str) -> StoredAdapter:
        stored = self.store.get(adapter_id)
        if stored is None:
            raise NotFound(f"No adapter '{adapter_id}'.", "id", "adapter_not_found")
        return stored

    def read_adapter(self, folder: Path):
        """An adapter's weights, checked against this base model (AdapterFormatError refuses them)."""
        return read_adapter(folder, self.lora_targets, self.max_lora_rank)

    def put_adapter(self, adapter_id: str, files: dict[str, bytes]) -> StoredAdapter:
        """Validate against this base model and store; the old version's caches are freed."""
        if adapter_id == self.model_name:
            raise InvalidAdapterId(f"'{adapter_id}' is the base model's name")
        if self.fusions.get(adapter_id) is not None:
            raise InvalidAdapterId(f"'{adapter_id}' is a fusion's name")
        stored = self.store.put(adapter_id, files, self.read_adapter)
        self._forget(adapter_id, keep_version=stored.version)
        warning = base_model_warning(stored.base_model_name, self.base_identities)
        if warning:
            log.warning("adapter %r: %s", adapter_id, warning)
        return stored

    def copy_adapter(self, adapter_id: str, folder: Path) -> bool:
        """Copy the current version of `adapter_id` into the new `folder`; False when there is none.
        The version is held while copying, so a replacement cannot remove it halfway."""
        stored = self.store.hold(adapter_id)
        if stored is None:
            return False
        try:
            folder.mkdir()
            for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                shutil.copyfile(stored.path / name, folder / name)
        finally:
            self.store.release(stored.id, stored.version)
        return True

    def put_adapter_folder(self, adapter_id: str, folder: Path) -> StoredAdapter:
        """`put_adapter` with the two files read from a folder on this machine (sizes checked first)."""
        return self.put_adapter(adapter_id, files_from_folder(folder, self.store.max_bytes))

    def delete_adapter(self, adapter_id: str) -> None:
        """Remove an adapter from the store, unless a fusion still uses it."""
        self.stored_adapter(adapter_id)
        users = self.fusions.using(adapter_id)
        if users:
            raise Conflict(
                f"The adapter '{adapter_id}' is a member of the fusion(s) {', '.join(users)}; delete those first.",
                "id",
                "adapter_in_use",
            )
        self.store.delete(adapter_id)
        self._forget(adapter_id)

    def delete_fusion(self, fusion_id: str) -> None:
        if not self.fusions.delete(fusion_id):
            raise NotFound(f"No fusion '{fusion_id}'.", "id", "fusion_not_found")
        self.routers.forget_fusion(fusion_id)

    def _forget(self, adapter_id: str, keep_version: int | None = None) -> None:
        """Free what the engine and the router cache hold of the adapter's other versions."""
        self.engine.forget_adapter(adapter_id, keep_version)
        self.routers.forget_adapter(adapter_id, keep_version)

    def token_text(self, token_id: int) -> str:
        """A token's text, as logprobs show it (cached; called on the event loop only)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text


def get_context(request: Request) -> ServerContext:
    return request.app.state.context


def require_api_key(request: Request) -> None:
    """Inference and reading: the API key when one is configured (the admin key also works)."""
    ctx = request.app.state.context
    _check_key(request, [k for k in (ctx.api_key, ctx.admin_key) if k] if ctx.api_key else [])


def require_admin_key(request: Request) -> None:
    """Changing what is served: the admin key when one is configured, else the API key."""
    ctx = request.app.state.context
    key = ctx.admin_key or ctx.api_key
    _check_key(request, [key] if key else [], admin=ctx.admin_key is not None)


def _check_key(request: Request, accepted: list[str], admin: bool = False) -> None:
    if not accepted:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    given = given.strip().encode()
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, k.encode()) for k in accepted):
        which = "admin key" if admin else "API key"
        raise ClientError(
            f"Incorrect or missing {which}. Send it as 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
            status=401,
        )
