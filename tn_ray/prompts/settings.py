"""Typed settings of the contrastive-prompt sources (rules, llm, released).

Secrets are never settings: the LLM's API key is read from the environment variable named
by ``LlmConfig.api_key_env`` and travels as a ``pydantic.SecretStr`` to the workers.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from tn_ray.config import StrictModel
from tn_ray.prompts.instruction import PAPER_MODEL, PAPER_PARAMS
from tn_ray.prompts.vocabulary import VOCABULARY


class RulesConfig(StrictModel):
    max_count: int = Field(6, ge=2, le=20, description="counting prompts get every other quantity 1..max_count of "
                                                       "their object (count)")
    composition_max_count: int = Field(3, ge=1, le=20, description="'a X and a Y' prompts get every other pair of "
                                                                   "quantities in 1..N x 1..N (count)")
    singles: bool = Field(True, description="'a X and a Y' prompts also get each object alone ('a X', 'a Y')")
    vocabulary: list[str] = Field(default_factory=lambda: list(VOCABULARY), min_length=1, description="singular nouns "
                                                                                                      "substituted for "
                                                                                                      "the objects of "
                                                                                                      "'a X and a Y' "
                                                                                                      "prompts, in "
                                                                                                      "this order "
                                                                                                      "(default: "
                                                                                                      "TIA2's 25 "
                                                                                                      "classes)")
    max_substitutions: int | None = Field(None, ge=0, description="substitutes per object, the first N of the "
                                                                  "vocabulary (count); None = all")


class ReleasedConfig(StrictModel):
    tia2_dir: str | None = Field(None, description="local copy of the TIA2 prompt sets; None = $TN_RAY_TIA2_DIR or "
                                                   "download")
    sets: list[str] = Field(
        default_factory=lambda: ["comprehensive", "counting", "composition"],
        min_length=1,
        description="TIA2 sets searched for x0, in this order (the first set holding x0 wins)",
    )


class LlmConfig(StrictModel):
    preset: Literal["tn_ray", "paper"] = Field(
        "tn_ray",
        description="the request: tn_ray = this project's instruction "
        "and category few-shot examples (n_prompts, "
        "max_examples, max_tokens apply); paper = Kim et "
        "al.'s Appendix D verbatim (Algorithm 1's system "
        "prompt with Table 19's examples per category; "
        "model gpt-4-0613, temperature 0.0, frequency "
        "penalty 0.2 unless set here; only temperature "
        "and frequency_penalty are sent)",
    )
    model: str = Field(
        "gpt-4o-mini", min_length=1, description="chat model name on the server (the paper used ChatGPT)"
    )
    base_url: str | None = Field(
        None,
        description="OpenAI-compatible API root, e.g. http://localhost:8000/v1 for "
        "vLLM; None = $OPENAI_BASE_URL, else OpenAI",
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        min_length=1,
        description="name of the environment variable holding the API key (local servers accept any non-empty value)",
    )
    temperature: float = Field(0.0, ge=0, le=2, description="sampling temperature (paper: 0)")
    frequency_penalty: float = Field(0.2, ge=-2, le=2, description="frequency penalty (paper: 0.2)")
    max_tokens: int = Field(512, ge=16, description="longest answer (tokens)")
    n_prompts: int = Field(
        10,
        ge=1,
        le=50,
        description="contrastive prompts asked for per x0; extra lines of an answer are dropped (count)",
    )
    min_prompts: int = Field(2, ge=1, description="an answer with fewer usable prompts is unparseable (count)")
    max_examples: int = Field(
        3, ge=0, le=16, description="few-shot examples per request, chosen by x0's failure categories (count)"
    )
    timeout_s: float = Field(60.0, gt=0, description="timeout of one HTTP request (seconds)")
    max_retries: int = Field(
        3,
        ge=0,
        le=20,
        description="openai client retries of one request on "
        "408/409/429/5xx/connection errors, with its backoff "
        "honouring Retry-After (count)",
    )
    attempts: int = Field(
        2,
        ge=1,
        le=10,
        description="requests per x0 before falling back: a new attempt follows an "
        "unparseable answer or a request the client gave up on (count)",
    )
    retry_backoff_s: float = Field(
        2.0, ge=0, description="pause before the second attempt, doubled for each later one (seconds)"
    )
    requests_per_minute: float | None = Field(
        None,
        gt=0,
        description="API rate limit shared by all workers "
        "(requests/minute); None = bounded only by the "
        "number of workers",
    )
    cache_dir: str | None = Field(
        None, description="answer cache folder; None = $TN_RAY_CACHE_DIR/prompts or ~/.cache/tn_ray/prompts"
    )
    fallback: bool = Field(True, description="when the LLM fails for an x0, use the rules source and record it")

    @model_validator(mode="before")
    @classmethod
    def _paper_defaults(cls, data: Any) -> Any:
        """``preset: paper`` defaults the model and sampling parameters to the paper's (keys given win)."""
        if isinstance(data, dict) and data.get("preset") == "paper":

            data = {"model": PAPER_MODEL, **PAPER_PARAMS, **data}
        return data


class SourcesConfig(StrictModel):
    rules: RulesConfig = Field(default_factory=RulesConfig, description="the rules source")
    llm: LlmConfig = Field(default_factory=LlmConfig, description="the llm source")
    released: ReleasedConfig = Field(default_factory=ReleasedConfig, description="the released (TIA2) source")
