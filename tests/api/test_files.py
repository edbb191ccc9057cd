"""The Files API for fine-tuning data: upload through the openai SDK, list, read back, delete,
and refusals (bad lines named by number, size limit, purpose, keys) that leave nothing behind.

What a line must look like is tested once, on the contract both sides import
(tests/fine_tuning/test_contract.py); here it is the route's behaviour.
"""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

ADMIN = {"Authorization": "Bearer ft-admin"}
CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
GOOD = (
    json.dumps(CHAT)
    + "\n"
    + json.dumps({"prompt": "2+2?", "completion": "4"})
    + "\n"
    + json.dumps({"instruction": "Shout", "input": "hi", "output": "HI"})
    + "\n"
).encode()


@pytest.fixture(scope="module")
def client(fine_tuning_server) -> openai.OpenAI:
    return fine_tuning_server.client(api_key="ft-admin", max_retries=0)


def _files_dir(server) -> Path:
    return server.data_dir / "files"


def _stored(server) -> set[str]:
    """The file objects in the server's store (its data dir; the folder goes with its last file)."""
    folder = _files_dir(server)
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def test_upload_list_read_back_and_delete(fine_tuning_server, client):
    uploaded = client.files.create(file=("train.jsonl", GOOD), purpose="fine-tune")
    assert uploaded.object == "file" and uploaded.id.startswith("file-")
    assert (uploaded.filename, uploaded.bytes, uploaded.purpose, uploaded.status) == (
        "train.jsonl",
        len(GOOD),
        "fine-tune",
        "processed",
    )
    assert uploaded.id in _stored(fine_tuning_server)

    assert client.files.retrieve(uploaded.id) == uploaded
    assert client.files.content(uploaded.id).content == GOOD
    assert uploaded.id in [f.id for f in client.files.list(purpose="fine-tune")]
    assert uploaded.id not in [f.id for f in client.files.list(purpose="fine-tune-results")]

    deleted = client.files.delete(uploaded.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (uploaded.id, True, "file")
    assert uploaded.id not in _stored(fine_tuning_server)
    assert uploaded.id not in [f.id for f in client.files.list()]
    for call in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError) as error:
            call(uploaded.id)
        assert error.value.body["code"] == "file_not_found"


def test_list_pages_with_after_and_order(client):
    ids = [client.files.create(file=(f"f{i}.jsonl", GOOD), purpose="fine-tune").id for i in range(3)]
    page = client.files.list(limit=2)
    assert [f.id for f in page.data] == ids[::-1][:2] and page.has_more
    assert client.files.list(limit=2, after=ids[1]).data[0].id == ids[0]
    assert [f.id for f in client.files.list(order="asc")][-3:] == ids
    assert [f.id for f in client.files.list(limit=1)][:3] == ids[::-1]  # the SDK follows `after` itself
    with pytest.raises(openai.BadRequestError, match="no 'file-nope'"):
        client.files.list(after="file-nope")
    for file_id in ids:
        client.files.delete(file_id)


BAD_FILES = {
    "not JSONL at all": (b"\x89PNG\r\n\x1a\n\x00\x00binary", ["line 1: not valid UTF-8", "line 2: invalid JSON"]),
    "a bad line among good ones": (GOOD + b"{oops\n" + GOOD, ["line 4: invalid JSON"]),
    "unknown format": (b'\n{"question": "q", "answer": "a"}\n', ["line 2: unknown format (keys: answer, question)"]),
    "no assistant": (
        json.dumps({"messages": [{"role": "user", "content": "q"}]}).encode(),
        ["line 1: no assistant message"],
    ),
    "tool role": (
        json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(),
        ["line 1: message 1: tool and function calls are not supported"],
    ),
    "not an object": (b'[1, 2]\r\n"text"\r\n', ["line 1: expected a JSON object, got a list", "line 2: expected"]),
    "wrong type": (b'{"prompt": "q", "completion": 4}', ['line 1: "completion" must be a string, got a number']),
    "empty": (b"\n\n", ["it has no examples"]),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_files_are_refused_by_line_and_leave_nothing(fine_tuning_server, client, name):
    data, expected = BAD_FILES[name]
    before = _stored(fine_tuning_server)
    with pytest.raises(openai.BadRequestError) as error:
        client.files.create(file=("data.jsonl", data), purpose="fine-tune")
    body = error.value.body
    assert (body["type"], body["param"], body["code"]) == ("invalid_request_error", "file", "invalid_file")
    for part in expected:
        assert part in body["message"]
    assert _stored(fine_tuning_server) == before


def test_size_limit_is_413_whether_declared_or_streamed(fine_tuning_server):
    big = b'{"prompt": "q", "completion": "' + b"a" * (1 << 20) + b'"}\n'
    before = _stored(fine_tuning_server)
    with fine_tuning_server.http(headers=ADMIN) as http:
        declared = http.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("big.jsonl", big)})
        assert declared.status_code == 413, declared.text
        assert declared.json()["error"]["type"] == "invalid_request_error"

        # Without a Content-Length (chunked), the route counts the bytes itself.
        boundary = "plait-boundary"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        body = [head, big[: 1 << 19], big[1 << 19 :], f"\r\n--{boundary}--\r\n".encode()]
        streamed = http.post(
            "/v1/files", content=iter(body), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        assert streamed.status_code == 413, streamed.text
        assert streamed.json()["error"]["code"] == "file_too_large"
    assert _stored(fine_tuning_server) == before


def test_purpose_field_and_keys(fine_tuning_server, client):
    with pytest.raises(openai.BadRequestError) as error:
        client.files.create(file=("d.jsonl", GOOD), purpose="assistants")
    assert error.value.body["param"] == "purpose" and "'fine-tune'" in error.value.body["message"]
    with fine_tuning_server.http(headers=ADMIN) as http:
        r = http.post("/v1/files", files={"file": ("d.jsonl", GOOD)})
        assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
        r = http.post("/v1/files", data={"purpose": "fine-tune"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    anonymous = fine_tuning_server.client(api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.files.create(file=("d.jsonl", GOOD), purpose="fine-tune")
    kept = client.files.create(file=("d.jsonl", GOOD), purpose="fine-tune")
    with pytest.raises(openai.AuthenticationError):
        anonymous.files.delete(kept.id)
    assert anonymous.files.retrieve(kept.id).id == kept.id  # reading needs only the API key (none here)
    client.files.delete(kept.id)
