"""A client for any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp server, OpenAI), with every
call cached on disk by its full request, so a rerun or a resumed run makes no new calls.

Configuration: base URL, model and key from arguments or the environment (PROGSAE_LLM_BASE_URL,
PROGSAE_LLM_MODEL, PROGSAE_LLM_API_KEY / OPENAI_API_KEY). Calls run with bounded concurrency, a timeout and
retries; a reply that cannot be used (HTTP error after retries, timeout, missing fields) comes back as a
`Reply` with `error` set, never as an exception. Whatever the server answered is cached (a malformed answer
is the answer to that request); failures to get an answer (timeouts, network) are not.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import ProgsaeError
from ..files import save_json


@dataclass
class Reply:
    text: str | None
    error: str | None = None
    cached: bool = False


class ChatClient:
    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None,
                 cache_dir: str | Path = ".progsae-llm-cache", timeout: float = 60, retries: int = 2,
                 concurrency: int = 4, temperature: float = 0.0, max_tokens: int = 512):  # fmt: skip
        self.base_url = (base_url or os.environ.get("PROGSAE_LLM_BASE_URL", "")).rstrip("/")
        self.model = model or os.environ.get("PROGSAE_LLM_MODEL", "")
        self.api_key = api_key or os.environ.get("PROGSAE_LLM_API_KEY") or os.environ.get("OPENAI_API_KEY", "")
        if not self.base_url or not self.model:
            raise ProgsaeError("an LLM endpoint needs a base URL and a model (PROGSAE_LLM_BASE_URL, PROGSAE_LLM_MODEL)")
        self.cache = Path(cache_dir)
        self.timeout, self.retries, self.concurrency = timeout, retries, concurrency
        self.temperature, self.max_tokens = temperature, max_tokens
        self.calls = 0  # requests actually sent (not served from the cache)
        self.lock = threading.Lock()

    def request(self, messages: list[dict]) -> dict:
        return {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens}  # fmt: skip

    def chat(self, messages: list[dict]) -> Reply:
        req = self.request(messages)
        path = _cache_path(self.cache, {"base_url": self.base_url, **req})
        if path.is_file():
            return _text(json.loads(path.read_text())["reply"], cached=True)
        error = None
        for attempt in range(self.retries + 1):
            try:
                with self.lock:
                    self.calls += 1
                body = self._post(req)
            except (urllib.error.URLError, TimeoutError, OSError, ValueError) as e:  # network, HTTP, timeout
                error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
                time.sleep(min(2.0, 0.2 * 2**attempt))
                continue
            save_json(path, {"request": req, "reply": body})  # any reply the server gave is kept, usable or not
            return _text(body)
        return Reply(None, error)  # not cached: a later run tries again

    def _post(self, req: dict) -> object:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        r = urllib.request.Request(f"{self.base_url}/chat/completions", json.dumps(req).encode(), headers)
        with urllib.request.urlopen(r, timeout=self.timeout) as resp:
            return json.loads(resp.read())

    def chat_many(self, conversations: list[list[dict]]) -> list[Reply]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self.chat, conversations))


def _cache_path(cache: Path, request: dict) -> Path:
    """Where the answer to `request` (everything that shapes it: endpoint or model, messages, settings) is kept."""
    return cache / f"{hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()}.json"


def _text(body, cached: bool = False) -> Reply:
    """The message text of a chat-completions reply, or the reason there is none."""
    try:
        text = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as e:
        return Reply(None, f"malformed reply (no choices[0].message.content: {type(e).__name__})", cached)
    if not isinstance(text, str):
        return Reply(None, "malformed reply (content is not text)", cached)
    return Reply(text, None, cached)


def parse_json(text: str | None) -> tuple[object | None, str | None]:
    """(value, None) for a reply holding JSON (bare or in a ``` block), else (None, why)."""
    if text is None:
        return None, "no reply"
    s = text.strip()
    if "```" in s:
        s = s.split("```")[1].removeprefix("json").strip()
    try:
        return json.loads(s), None
    except json.JSONDecodeError as e:
        return None, f"bad JSON ({e.msg})"
