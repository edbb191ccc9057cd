"""`--publish`: upload a finished adapter, or a learned fusion, to a running Plait server."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from plait.trainer.model import ADAPTER_FILES

TIMEOUT_SECONDS = 300.0  # the server validates and loads the adapter before it answers


class PublishError(Exception):
    """The upload failed; the message is one line (the server's own error message when it sent one)."""


def publish(
    base_url: str, adapter_id: str, folder: Path, admin_key: str | None, transport: httpx.BaseTransport | None = None
) -> dict:
    """POST the adapter files to {base_url}/v1/adapters as multipart; returns the server's JSON reply."""
    handles = [(folder / name).open("rb") for name in ADAPTER_FILES]
    try:
        files = [
            ("files", (name, handle, "application/octet-stream"))
            for name, handle in zip(ADAPTER_FILES, handles, strict=True)
        ]
        return _post(base_url, "adapters", {"id": adapter_id}, files, admin_key, transport)
    finally:
        for handle in handles:
            handle.close()


def publish_fusion(
    base_url: str, fusion: dict, router_file: Path, admin_key: str | None, transport: httpx.BaseTransport | None = None
) -> dict:
    """POST a learned fusion (its record as JSON, its gates as a file) to {base_url}/v1/fusions."""
    with router_file.open("rb") as handle:
        files = [("router_weights", (router_file.name, handle, "application/octet-stream"))]
        return _post(base_url, "fusions", {"fusion": json.dumps(fusion)}, files, admin_key, transport)


def _post(base_url: str, route: str, data: dict, files: list, admin_key: str | None, transport) -> dict:
    url = base_url.rstrip("/")
    if not url.endswith("/v1"):
        url += "/v1"
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    try:
        with httpx.Client(transport=transport, timeout=TIMEOUT_SECONDS) as client:
            response = client.post(f"{url}/{route}", data=data, files=files, headers=headers)
    except httpx.HTTPError as exc:
        raise PublishError(f"cannot reach {url}: {exc}") from None
    if response.is_error:
        raise PublishError(f"{url}/{route} answered {response.status_code}: {_error_message(response)}")
    try:
        return response.json()
    except ValueError:
        return {}


def _error_message(response: httpx.Response) -> str:
    # OpenAI's error shape, {"error": {"message": ...}}; anything else is shown as text.
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text.strip() or response.reason_phrase
    return " ".join(str(message).split())[:500]
