"""Replaying a real trace into vLLM's OpenAI-compatible server (the production path).

Same order, pacing and framework events as the offline replay
(``engine_replay.ReplayDriver``); requests go to ``/v1/completions`` as token
ids, streamed so the first token's arrival is timed, and carry the agent
identity as ``vllm_xargs``. The framework events go wherever the emitter sends
them: with a Kafka producer, to the framework topic that policy workers
(``agentrt worker``) join with the server's engine events. The server applies
their decisions itself (``--scheduler-cls``); nothing here talks to the policy.

Standard library only (threads and ``http.client``), so the command runs from
the CLI environment without vLLM installed.
"""
from __future__ import annotations

import http.client
import json
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence
from urllib.parse import urlsplit

from framework_emitter.sdk import AgentEventEmitter
from framework_emitter.traces import TraceCall

from .engine_replay import ArmResult, ReplayDriver, Submission


class ServerError(RuntimeError):
    """The server refused or failed a request."""


@dataclass
class Completion:
    request_id: str
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    first_token: float
    finished: float
    error: str | None = None


def complete_streaming(base_url: str, model: str, sent: Submission, timeout_s: float = 600.0) -> Completion:
    """One streamed completion: when its first token arrived, and the usage the server reports."""
    url = urlsplit(base_url)
    connection = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout_s)
    body = {"model": model, "prompt": sent.token_ids, "max_tokens": sent.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "vllm_xargs": sent.tags}
    try:
        connection.request("POST", f"{url.path.rstrip('/')}/v1/completions", body=json.dumps(body),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise ServerError(f"HTTP {response.status}: {response.read()[:500].decode(errors='replace')}")
        first_token: float | None = None
        usage: dict = {}
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("choices") and first_token is None:
                first_token = time.time()
            if chunk.get("usage"):
                usage = chunk["usage"]
        now = time.time()
        details = usage.get("prompt_tokens_details") or {}
        return Completion(sent.request_id, int(usage.get("prompt_tokens", len(sent.token_ids))),
                          int(details.get("cached_tokens") or 0), int(usage.get("completion_tokens", 0)),
                          first_token or now, now)
    finally:
        connection.close()


def replay_server(base_url: str, model: str, order: Sequence[TraceCall], *, workload: str, vocab_size: int,
                  max_prompt_tokens: int, emitter: AgentEventEmitter | None = None, max_output_tokens: int = 8,
                  max_in_flight: int = 8, time_scale: float = 0.0, timeout_s: float = 600.0,
                  progress: Callable[[int, int], None] | None = None, announce: bool = True) -> ArmResult:
    """Run ``order`` through the server at ``base_url`` (which must serve ``model`` and count cached tokens:
    ``--enable-prompt-tokens-details``). A failed request stops the replay with ``ServerError``."""
    driver = ReplayDriver(order, workload=workload, vocab_size=vocab_size, max_prompt_tokens=max_prompt_tokens,
                          max_output_tokens=max_output_tokens, max_in_flight=max_in_flight, time_scale=time_scale,
                          emitter=emitter, announce=announce)
    done: queue.Queue[Completion] = queue.Queue()

    def send(sent: Submission) -> None:
        try:
            done.put(complete_streaming(base_url, model, sent, timeout_s))
        except Exception as exc:  # noqa: BLE001 - handed to the driver thread, raised there
            done.put(Completion(sent.request_id, 0, 0, 0, 0.0, time.time(), error=f"{type(exc).__name__}: {exc}"))

    began = time.perf_counter()
    while not driver.done:
        for sent in driver.ready(time.time()):
            threading.Thread(target=send, args=(sent,), daemon=True, name=f"replay-{sent.index}").start()
        try:
            answer = done.get(timeout=min(driver.wait_s(time.time()), 0.05) if not driver.in_flight else timeout_s)
        except queue.Empty:
            if driver.in_flight:
                raise ServerError(f"no answer from {base_url} in {timeout_s:.0f} s")
            continue
        if answer.error:
            raise ServerError(f"request {answer.request_id} failed: {answer.error}")
        driver.finished(answer.request_id, prompt_tokens=answer.prompt_tokens, cached_tokens=answer.cached_tokens,
                        output_tokens=answer.output_tokens, first_token=answer.first_token, now=answer.finished)
        if progress:
            progress(len(driver.results), len(order))
    driver.warn_truncated()
    return ArmResult("server", driver.results, time.perf_counter() - began, driver.output_tokens)
