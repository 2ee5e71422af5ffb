"""The auto-interp LLM path against a loopback server that speaks the OpenAI chat-completions protocol."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from progsae.interp.llm import ChatClient, parse_json


class Handler(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):  # noqa: N802
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Handler.seen.append(req)
        prompt = req["messages"][-1]["content"]
        if "SLOW" in prompt:
            time.sleep(1.5)  # longer than the client's timeout
        if "MALFORMED" in prompt:
            body = {"id": "x", "object": "chat.completion"}  # no choices
        elif "NOTJSON" in prompt:
            body = {"choices": [{"message": {"role": "assistant", "content": "I refuse to answer."}}]}
        else:
            content = json.dumps({"explanation": f"fires on {prompt.split()[-1]}", "model": req["model"]})
            body = {"choices": [{"message": {"role": "assistant", "content": content}}]}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_calls_malformed_replies_timeouts_and_a_rerun_from_the_cache(server, tmp_path):
    Handler.seen = []
    kw = {"model": "judge-1", "cache_dir": tmp_path / "cache", "timeout": 0.5, "retries": 1}
    client = ChatClient(server, **kw)
    convs = [[{"role": "user", "content": c}] for c in ("explain cat", "explain dog", "MALFORMED", "NOTJSON", "SLOW")]
    ok, ok2, malformed, notjson, slow = client.chat_many(convs)
    assert parse_json(ok.text)[0] == {"explanation": "fires on cat", "model": "judge-1"}
    assert parse_json(ok2.text)[0]["explanation"] == "fires on dog"
    assert malformed.text is None and "malformed reply" in malformed.error
    value, why = parse_json(notjson.text)
    assert value is None and why.startswith("bad JSON")  # recorded as such, no exception
    assert slow.text is None and "timed out" in slow.error.lower()
    assert client.calls == 4 + 2  # four answered, the slow one tried twice (retries=1)
    # a rerun: every answered request comes from the cache; only the one that never got an answer is retried
    again = ChatClient(server, **{**kw, "retries": 0})
    replies = again.chat_many(convs[:4])
    assert again.calls == 0 and all(r.cached for r in replies)
    assert [r.text for r in replies] == [ok.text, ok2.text, None, notjson.text]
    assert {r["model"] for r in Handler.seen} == {"judge-1"}
