"""`--publish`: upload a finished adapter to a running Plait server."""

from __future__ import annotations

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
    url = base_url.rstrip("/")
    if not url.endswith("/v1"):
        url += "/v1"
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    handles = [(folder / name).open("rb") for name in ADAPTER_FILES]
    try:
        with httpx.Client(transport=transport, timeout=TIMEOUT_SECONDS) as client:
            response = client.post(
                f"{url}/adapters",
                data={"id": adapter_id},
                files=[("files", (name, handle, "application/octet-stream")) for name, handle in
                       zip(ADAPTER_FILES, handles, strict=True)],
                headers=headers,
            )  # fmt: skip
    except httpx.HTTPError as exc:
        raise PublishError(f"cannot reach {url}: {exc}") from None
    finally:
        for handle in handles:
            handle.close()
    if response.is_error:
        raise PublishError(f"{url}/adapters answered {response.status_code}: {_error_message(response)}")
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
