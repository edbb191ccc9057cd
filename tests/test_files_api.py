"""The Files API for fine-tuning data: upload through the openai SDK, list, read back, delete,
and refusals (bad lines named by number, size limit, purpose, keys) that leave nothing behind.

The upload check (`plait.server.fine_tuning.files`) is the server's own code, since the server
never imports the trainer; a table here holds it to the trainer's verdict line by line.
"""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from plait.server.fine_tuning.errors import FineTuningError
from plait.server.fine_tuning.files import check_line, check_training_file
from plait.trainer.data import DataError, parse_example, read_examples

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
    return server.log_path.parent / f"data-{server.base_url.rsplit(':', 1)[1]}" / "files"


def _stored(server) -> set[str]:
    return {p.name for p in _files_dir(server).iterdir()}


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
    "tool role": (json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(), ["line 1: message 1: role"]),
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


def test_many_bad_lines_are_counted_and_the_first_listed(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"{}\n" * 12)
    with pytest.raises(FineTuningError) as error:
        check_training_file(path)
    message = error.value.message
    assert message.startswith("Invalid training file (12 problems): line 1: unknown format")
    assert "line 5:" in message and "line 6:" not in message and message.endswith("and 7 more.")


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


# --- the server's check against the trainer's -------------------------------------------------

LINES = [
    CHAT,
    {"messages": [{"role": "system", "content": "Be brief."}, *CHAT["messages"]]},
    {
        "messages": [
            *CHAT["messages"],
            {"role": "user", "content": "More"},
            {"role": "assistant", "content": "No.", "weight": 0},
        ]
    },
    {"messages": [{"role": "user", "content": "q", "name": "ann"}, {"role": "assistant", "content": "a", "weight": 1}]},
    {"prompt": "q", "completion": "a"},
    {"prompt": "", "completion": "a"},
    {"instruction": "i", "output": "o"},
    {"instruction": "i", "input": "x", "output": "o"},
    # refused by both
    {"messages": []},
    {"messages": "hi"},
    {"messages": [{"role": "user", "content": "q"}]},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]},
    {"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": True}]},
    {"messages": [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": "a"}]},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "tool_calls": []}]},
    {"messages": [{"role": "function", "content": "q"}, {"role": "assistant", "content": "a"}]},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": []},
    {"messages": [{"role": "user", "content": "q"}, "a"]},
    {"prompt": "q"},
    {"prompt": "q", "completion": " "},
    {"prompt": "q", "completion": "a", "extra": 1},
    {"prompt": None, "completion": "a"},
    {"instruction": "i", "input": 3, "output": "o"},
    {"output": "o"},
    {"text": "plain"},
    {},
    [1],
    "text",
    3,
]


@pytest.mark.parametrize("record", LINES, ids=range(len(LINES)))
def test_the_upload_check_agrees_with_the_trainer(record):
    line = json.dumps(record)
    verdicts = []
    for check in (check_line, parse_example):
        try:
            check(line)
            verdicts.append("accepted")
        except ValueError:
            verdicts.append("refused")
    assert verdicts[0] == verdicts[1], verdicts


@pytest.mark.parametrize("raw", [b"{oops}", b"", b"   ", b"{} {}", b"\xff"])
def test_the_upload_check_agrees_on_what_is_not_json(raw, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(CHAT).encode() + b"\n" + raw + b"\n")
    server_verdict = trainer_verdict = "accepted"
    try:
        check_training_file(path)
    except FineTuningError:
        server_verdict = "refused"
    try:
        read_examples(path)
    except DataError:
        trainer_verdict = "refused"
    assert server_verdict == trainer_verdict


def test_line_numbers_are_the_trainers(tmp_path):
    """Blank lines, CRLF, a lone CR and a byte-order mark count as the trainer counts them."""
    good, bad = json.dumps(CHAT).encode(), b"{bad"
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\r\n\r\n" + bad + b"\r" + good + b"\n\n" + bad + b"\n" + good)
    with pytest.raises(DataError) as trainer:
        read_examples(path)
    with pytest.raises(FineTuningError) as server:
        check_training_file(path)
    numbers = [p.split(":")[0] for p in trainer.value.problems]
    assert numbers == ["line 3", "line 6"]
    assert all(f"{n}: invalid JSON" in server.value.message for n in numbers)
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\r\n\r\n" + good + b"\r" + good + b"\n")
    assert check_training_file(path) == len(read_examples(path)) == 3
