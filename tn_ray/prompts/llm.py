"""Contrastive prompts from an OpenAI-compatible chat model, cached, with a rules fallback.

One request per x0 (system instruction + few-shot examples chosen by x0's failure
categories + x0) through the ``openai`` client, which retries 408/409/429/5xx and
connection errors itself (``max_retries``, its exponential backoff honouring Retry-After)
within ``timeout_s`` per request. Around it: ``attempts`` requests per x0 when an answer is
unparseable or the client gives up, ``retry_backoff_s`` apart (doubling). A parsed answer,
or an x0 whose every attempt gave an unparseable answer, is written to the cache at once; a
transport failure is not cached (the next run tries again). Then the x0 falls back to the
rules and the result says so. A refused key (401/403) or unknown model (404) stops the run.

The API key comes from the environment (``LlmConfig.api_key_env``) as a ``SecretStr``
and is only handed to the client; it is never logged, cached or written.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr

from tn_ray.config import ConfigError
from tn_ray.prompts.base import ContrastSet
from tn_ray.prompts.cache import AnswerCache, cache_key
from tn_ray.prompts.instruction import INSTRUCTION_VERSION, PAPER_INSTRUCTION_VERSION, messages, paper_messages
from tn_ray.prompts.parsing import parse_answer
from tn_ray.prompts.rules import NOT_PARSED, RulesSource
from tn_ray.prompts.settings import LlmConfig, RulesConfig

log = logging.getLogger(__name__)


class MissingApiKeyError(ConfigError):
    """The llm source is needed but its API key variable is unset or empty."""


class LlmError(ConfigError):
    """The LLM server refuses every request (bad key, unknown model): retrying cannot help."""


def api_key_from_env(cfg: LlmConfig) -> SecretStr:
    value = os.environ.get(cfg.api_key_env, "")
    if not value.strip():
        raise MissingApiKeyError(
            f"the llm source needs an API key, but the environment variable {cfg.api_key_env} is not set "
            f"(export {cfg.api_key_env}=...; a local OpenAI-compatible server such as vLLM or Ollama accepts "
            "any non-empty value; `llm.api_key_env` names another variable)")
    return SecretStr(value)


def resolve_base_url(cfg: LlmConfig) -> str | None:
    """``cfg.base_url``, else ``$OPENAI_BASE_URL``, else None (the client's default, OpenAI)."""
    return cfg.base_url or os.environ.get("OPENAI_BASE_URL") or None


def public_url(url: str | None) -> str:
    """A base URL fit for reports: no user:password, no query string."""
    if not url:
        return "https://api.openai.com/v1 (client default)"
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def request_params(cfg: LlmConfig) -> dict:
    """What the answer depends on besides model, x0 and instruction (the cache key's params)."""
    if cfg.preset == "paper":  # Algorithm 1 sends these two only
        return {"temperature": cfg.temperature, "frequency_penalty": cfg.frequency_penalty}
    return {"temperature": cfg.temperature, "frequency_penalty": cfg.frequency_penalty,
            "max_tokens": cfg.max_tokens, "n_prompts": cfg.n_prompts, "max_examples": cfg.max_examples}


def instruction_version(cfg: LlmConfig) -> str:
    """The version of the instruction and examples the request uses (part of the cache key)."""
    return PAPER_INSTRUCTION_VERSION if cfg.preset == "paper" else INSTRUCTION_VERSION


def request(cfg: LlmConfig, x0: str) -> dict:
    """The keyword arguments of ``chat.completions.create`` for x0 (model, messages, sampling parameters)."""
    if cfg.preset == "paper":
        return {"model": cfg.model, "messages": paper_messages(x0), **request_params(cfg)}
    return {
        "model": cfg.model,
        "messages": messages(x0, cfg.n_prompts, cfg.max_examples),
        "temperature": cfg.temperature,
        "frequency_penalty": cfg.frequency_penalty,
        "max_tokens": cfg.max_tokens,
    }


def _describe(err: Exception) -> str:
    import openai

    if isinstance(err, openai.APIStatusError):
        return f"HTTP {err.status_code} ({type(err).__name__})"
    return type(err).__name__


class LlmSource:
    """``generate(x0s)``: cached answers first; the client is built on the first cache miss."""

    name = "llm"
    sleep = staticmethod(time.sleep)  # the pauses of the rate limit and of the attempts

    def __init__(
        self,
        cfg: LlmConfig | None = None,
        api_key: SecretStr | None = None,
        rules: RulesConfig | None = None,
        base_url: str | None = None,
        workers: int = 1,
    ):
        self.cfg = cfg or LlmConfig()
        self._api_key = api_key
        self.base_url = base_url or resolve_base_url(self.cfg)
        self.cache = AnswerCache(self.cfg.cache_dir)
        self.rules = RulesSource(rules) if self.cfg.fallback else None
        self.params = request_params(self.cfg)
        # each of `workers` concurrent workers keeps its share of the rate limit
        self.min_interval_s = 60.0 * workers / self.cfg.requests_per_minute if self.cfg.requests_per_minute else 0.0
        self._client = None
        self._last_request = -float("inf")

    def key(self, x0: str) -> str:
        return cache_key(self.cfg.model, x0, self.params, instruction_version(self.cfg))

    def missing(self, x0s: Sequence[str]) -> list[str]:
        """The x0s whose answer is not cached (they need the API)."""
        return [x for x in x0s if self.key(x) not in self.cache]

    @property
    def client(self):
        if self._client is None:
            import openai

            key = self._api_key or api_key_from_env(self.cfg)
            self._client = openai.OpenAI(
                api_key=key.get_secret_value(),
                base_url=self.base_url,
                timeout=self.cfg.timeout_s,
                max_retries=self.cfg.max_retries,
            )
        return self._client

    def _ask(self, x0: str) -> str:
        wait = self._last_request + self.min_interval_s - time.monotonic()
        if wait > 0:
            self.sleep(wait)
        self._last_request = time.monotonic()
        resp = self.client.chat.completions.create(**request(self.cfg, x0))
        choices = getattr(resp, "choices", None) or []
        return (choices[0].message.content or "") if choices and choices[0].message else ""

    def _record(self, key: str, x0: str, status: str, answers: list[str], prompts: list[str]) -> None:
        self.cache.put(
            {
                "key": key,
                "model": self.cfg.model,
                "x0": x0,
                "params": self.params,
                "instruction_version": instruction_version(self.cfg),
                "status": status,
                "answers": answers,
                "prompts": prompts,
            }
        )

    def _fallback(self, x0: str, reason: str, calls: int, cached: bool = False) -> ContrastSet:
        if self.rules is None:
            return ContrastSet(x0, [], self.name, error=reason, api_calls=calls, cached=cached)
        made = self.rules.one(x0)
        if not made.ok:
            return ContrastSet(
                x0, [], self.name, error=f"{reason}; fallback {NOT_PARSED}", api_calls=calls, cached=cached
            )
        return ContrastSet(x0, made.prompts, made.source, note=reason, api_calls=calls, cached=cached)

    def one(self, x0: str) -> ContrastSet:
        import openai

        key = self.key(x0)
        rec = self.cache.get(key)
        if rec is not None:
            if rec.get("status") == "ok":
                return ContrastSet(x0, list(rec["prompts"]), self.name, cached=True)
            return self._fallback(x0, f"llm: cached unparseable answer ({self.cfg.model})", 0, cached=True)
        calls, problems, answers = 0, [], []
        for attempt in range(self.cfg.attempts):
            if attempt:
                self.sleep(self.cfg.retry_backoff_s * 2 ** (attempt - 1))
            calls += 1
            try:
                text = self._ask(x0)
            except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
                raise LlmError(
                    f"the LLM server at {public_url(self.base_url)} refused the API key from "
                    f"${self.cfg.api_key_env} ({_describe(err)})"
                ) from None
            except openai.NotFoundError as err:
                raise LlmError(
                    f"the LLM server at {public_url(self.base_url)} does not serve model "
                    f"'{self.cfg.model}' or the chat-completions route ({_describe(err)})"
                ) from None
            except openai.APIError as err:
                # a transport failure names the server it tried (the URL, without credentials)
                where = f" to {public_url(self.base_url)}" if isinstance(err, openai.APIConnectionError) else ""
                problems.append(
                    _describe(err)
                    + where
                    + (f" after {self.cfg.max_retries} client retries" if self.cfg.max_retries else "")
                )
                log.warning("llm: request for %r failed: %s", x0[:60], problems[-1])
                continue
            prompts = parse_answer(text, x0, self.cfg.n_prompts)
            if len(prompts) >= self.cfg.min_prompts:
                self._record(key, x0, "ok", [*answers, text], prompts)
                return ContrastSet(x0, prompts, self.name, api_calls=calls)
            answers.append(text)
            problems.append(f"unparseable answer ({len(prompts)} usable prompts, {self.cfg.min_prompts} needed)")
        if len(answers) == self.cfg.attempts:  # the server answered every time: remember it
            self._record(key, x0, "unparseable", answers, [])
        return self._fallback(x0, f"llm: {calls} attempts failed: " + "; ".join(problems), calls)

    def generate(self, x0s: Sequence[str]) -> list[ContrastSet]:
        return [self.one(x) for x in x0s]
