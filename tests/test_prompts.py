"""Contrastive prompt sources: rules, LLM (against a local OpenAI-compatible server), the
Ray-sharded synthesize command, the overlap report and a TIA2 evaluation with rule-built sets."""
from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from tn_ray.prompts import build, clean, normalize
from tn_ray.prompts.base import ContrastSet
from tn_ray.prompts.cache import AnswerCache
from tn_ray.prompts.categories import CATEGORIES, categorize
from tn_ray.prompts.instruction import EXAMPLES, INSTRUCTION_VERSION, messages
from tn_ray.prompts.llm import LlmError, LlmSource, MissingApiKeyError
from tn_ray.prompts.parsing import parse_answer
from tn_ray.prompts.quantities import parse
from tn_ray.prompts.rules import contrast
from tn_ray.prompts.settings import LlmConfig, RulesConfig, SourcesConfig
from tn_ray.prompts.synthesize import SynthesisConfig, read_prompts, synthesize
from tn_ray.prompts.vocabulary import CIFAR10, COCO15, VOCABULARY, derive

WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8}


# ------------------------------------------------------------------------------------------
# vocabulary, plurals, rules
# ------------------------------------------------------------------------------------------


def test_vocabulary_is_cifar10_plus_15_coco_classes_of_tia2(tia2_dir):
    assert derive(tia2_dir) == list(VOCABULARY)
    assert len(VOCABULARY) == 25 and set(CIFAR10) <= set(VOCABULARY)
    assert len(CIFAR10) == 10 and len(COCO15) == 15 and not set(CIFAR10) & set(COCO15)


@pytest.mark.parametrize("x0, expected", [
    ("a realistic photo of three deer", ["a realistic photo of a deer", "a realistic photo of two deer", "a realistic "
                                                                                                         "photo of six "
                                                                                                         "deer"]),
    ("a photo of a sheep", ["a photo of two sheep", "a photo of five sheep"]),
    ("a photo of a person", ["a photo of two people", "a photo of three people"]),
    ("a photo of two knives", ["a photo of a knife", "a photo of three knives"]),
    ("a photo of three mice", ["a photo of a mouse", "a photo of two mice"]),
    ("a realistic photo of two teddy bears", ["a realistic photo of a teddy bear", "a realistic photo of four teddy "
                                                                                   "bears"]),
    ("a realistic photo of two umbrellas", ["a realistic photo of an umbrella"]),
    ("a photo of 3 wolves", ["a photo of 1 wolf", "a photo of 2 wolves"]),
    ("Five cars on the street.", ["A car on the street.", "Six cars on the street."]),
    ("One cat and two dogs sitting on the grass.", ["One cat and one dog sitting on the grass.", "Two dogs sitting on "
                                                                                                 "the grass."]),
])
def test_counting_rules_plurals_and_articles(x0, expected):
    out = contrast(x0)
    for e in expected:
        assert e in out, (e, out)
    assert len(out) == (5 if " and " not in x0 else 56) and x0 not in out and len(set(out)) == len(out)


def test_counting_rules_contain_every_released_quantity_up_to_six(tia2_dir):
    """The released counting sets spell plurals/articles the benchmark's way; the rules must match."""
    from tn_ray.data.tia2 import load_prompt_sets

    released = load_prompt_sets("counting", tia2_dir)
    for x0, rel in released.items():
        out = contrast(x0)
        q = parse(x0).slots[0].count
        assert len(out) == 5 and x0 not in out
        assert sorted(parse(p).slots[0].count for p in out) == [n for n in range(1, 7) if n != q]
        small = [p for p in rel if WORDS[p.split(" of ")[1].split()[0]] <= 6]
        assert set(small) <= set(out), (x0, set(small) - set(out))


def test_composition_rules_on_tia2(tia2_dir):
    from tn_ray.data.tia2 import load_prompt_sets

    released = load_prompt_sets("composition", tia2_dir)
    for x0 in list(released)[::7]:
        out = contrast(x0)
        a, b = parse(x0).slots
        assert len(out) == 2 + 8 + 2 * 23 and len(set(out)) == len(out) and x0 not in out
        # each object alone and every quantity pair, written the benchmark's way when it uses "and"
        grid = [p for p in released[x0] if p.startswith("a realistic photo of") and parse(p) is not None
                and [s.noun for s in parse(p).slots] == [a.noun, b.noun] and max(s.count for s in parse(p).slots) <= 3]
        assert len(grid) >= 5 and set(grid) <= set(out)
        assert released[x0][0] in out and released[x0][1] in out
        # substitutions: exactly one object replaced by another vocabulary class, quantity kept
        for p in out[10:]:
            s = parse(p).slots
            assert [x.count for x in s] == [1, 1]
            changed = [(old.noun, new.noun) for old, new in zip((a, b), s) if old.noun != new.noun]
            assert len(changed) == 1 and changed[0][1] in VOCABULARY and changed[0][1] not in (a.noun, b.noun)


def test_rules_settings_and_unparseable_prompts():
    cfg = RulesConfig(max_substitutions=2, composition_max_count=2, singles=False)
    out = contrast("a photo of a cat and a dog", cfg)
    assert out == ["a photo of a cat and two dogs", "a photo of two cats and a dog", "a photo of two cats and two dogs",
                   "a photo of an airplane and a dog", "a photo of an apple and a dog",
                   "a photo of a cat and an airplane", "a photo of a cat and an apple"]
    src = build("rules")
    bad = src.generate(["dog and horse"])[0]
    assert bad.prompts == [] and "no '<quantity> <object>' phrase" in bad.error and not bad.ok


QTY = st.sampled_from(["a", "two", "three", "four", "five", "six"])
NOUN = st.sampled_from(list(VOCABULARY) + ["mouse", "knife", "person", "sheep", "wolf", "box"])
PREFIX = st.sampled_from(["", "a realistic photo of ", "a photo of ", "an image showing "])


def _phrase(q: str, noun: str) -> str:
    from tn_ray.prompts.quantities import plural, with_article

    return with_article(noun) if q == "a" else f"{q} {plural(noun)}"


@settings(max_examples=60, deadline=None)
@given(PREFIX, QTY, NOUN, QTY, NOUN, st.booleans())
def test_rules_properties(prefix, q1, n1, q2, n2, pair):
    """Never x0, no duplicates, deterministic, and every prompt differs from x0 in count or object."""
    if pair and n1 == n2:
        n2 = "vase" if n1 != "vase" else "cup"
    x0 = prefix + _phrase(q1, n1) + (" and " + _phrase(q2, n2) if pair else "")
    out = contrast(x0)
    assert out == contrast(x0)
    assert normalize(x0) not in {normalize(p) for p in out}
    assert len({normalize(p) for p in out}) == len(out)
    base = parse(x0)
    meaning = lambda q: tuple((s.count, s.noun) for s in q.slots)  # noqa: E731
    assert len(base.slots) == (2 if pair else 1)
    for p in out:
        q = parse(p)
        assert q is not None and q.prefix == prefix and meaning(q) != meaning(base), p
        for s in q.slots:  # number agreement: the noun is singular exactly when the count is 1
            word = s.text.split()[0].lower()
            assert WORDS[word] == s.count and s.text.endswith(s.noun) == (s.count == 1 or s.noun in ("sheep", "deer"))


# ------------------------------------------------------------------------------------------
# categories, instruction, parsing
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x0, cat", [
    ("A sign that says 'Diffusion'.", "text"), ("The Oriental Pearl in oil painting", "style"),
    ("a realistic photo of a deer and a truck", "composition"), ("Three dogs on the street.", "counting"),
    ("A heart made of chocolate", "creative"), ("a tiger in a forest", "location"),
    ("A pink colored giraffe.", "colors"), ("A cat on the left of a dog.", "spatial"),
    ("a realistic photo of an orange", "counting"),
])
def test_categories(x0, cat):
    assert cat in categorize(x0)
    assert "colors" not in categorize("a realistic photo of an orange and a cat")


def test_categories_agree_with_tia2_subcategories(tia2_dir):
    from tn_ray.data.tia2 import load_subcategories

    truth = {p: c for p, c in load_subcategories(tia2_dir).items() if c != "reddit"}
    hits = [truth[p] in categorize(p) for p in truth]
    assert len(truth) == 80 and np.mean(hits) >= 0.9


def test_messages_carry_instruction_and_category_examples():
    assert set(EXAMPLES) == set(CATEGORIES) and all(1 <= len(v) <= 2 for v in EXAMPLES.values())
    msgs = messages("A sign that says 'Diffusion'.", 7, 3)
    assert msgs[0]["role"] == "system" and "7 prompts" in msgs[0]["content"]
    assert msgs[-1] == {"role": "user", "content": "A sign that says 'Diffusion'."}
    assert msgs[1]["content"] == EXAMPLES["text"][0][0] and len(msgs) <= 2 + 2 * 3
    assert [m["role"] for m in msgs[1:-1]] == ["user", "assistant"] * ((len(msgs) - 2) // 2)
    counting = messages("a realistic photo of three deer", 10, 2)
    assert counting[1]["content"] == EXAMPLES["counting"][0][0] and len(counting) == 2 + 2 * 2
    assert INSTRUCTION_VERSION.startswith("v1-")


def test_parse_answer_formats():
    x0 = "a photo of one cat"
    answer = ('Here are the prompts:\n1. "a photo of two cats"\n2) a photo of three cats,\n- \'a photo of a dog\'\n'
              '* a photo of ONE cat.\n(5) **a photo of four cats**\n6. a photo of two cats\n7.\n\nHope this helps!')
    assert parse_answer(answer, x0) == ["a photo of two cats", "a photo of three cats", "a photo of a dog", "a photo "
                                                                                                            "of four "
                                                                                                            "cats"]
    assert parse_answer(answer, x0, limit=2) == ["a photo of two cats", "a photo of three cats"]
    assert parse_answer('["a b", "x", "c d", "a b"]', "x") == ["a b", "c d"]
    assert parse_answer('```json\n["a b", "c d"]\n```', "x") == ["a b", "c d"]
    assert parse_answer("Two options:\nfirst prompt\n\n second prompt ", "x") == ["first prompt", "second prompt"]
    assert parse_answer("", "x") == [] and parse_answer(None, "x") == []
    assert parse_answer("Sorry, I can't help with that.", "x") == ["Sorry, I can't help with that."]


TEXT = st.text(alphabet=st.sampled_from("abcXYZ019 "), min_size=1, max_size=20)


@settings(max_examples=80, deadline=None)
@given(st.lists(TEXT, min_size=1, max_size=8), st.sampled_from(["{i}. ", "{i}) ", "- ", "* ", "\u2022 ", "({i}) "]),
       st.sampled_from(['"', "'", "\u201c", ""]), TEXT)
def test_parse_answer_round_trip(prompts, marker, quote, x0):
    """Any marked, quoted list between a lead-in and a sign-off parses back to its cleaned items."""
    assume(any(p.strip() for p in prompts))
    close = "\u201d" if quote == "\u201c" else quote
    answer = (
        "Sure, here they are:\n"
        + "\n".join(marker.format(i=i) + quote + p + close for i, p in enumerate(prompts, 1))
        + "\nDone."
    )
    got = parse_answer(answer, x0)
    assert got == clean(x0, prompts)
    assert normalize(x0) not in {normalize(g) for g in got} and len({normalize(g) for g in got}) == len(got)


# ------------------------------------------------------------------------------------------
# a local OpenAI-compatible server
# ------------------------------------------------------------------------------------------


def good_answer(x0: str) -> str:
    return (
        f"Here are the prompts:\n1. \"{x0} at night\"\n2) {x0} in the rain\n- '{x0} in winter'\n"
        f"3. {x0}\n4. {x0} at night\n5.\n"
    )


GOOD = lambda x0: [f"{x0} at night", f"{x0} in the rain", f"{x0} in winter"]  # noqa: E731


class FakeLLM:
    """Chat completions on 127.0.0.1; ``script[x0]`` lists what to do per request (last repeats)."""

    def __init__(self, key: str):
        self.key, self.script, self.requests, self.delay = key, {}, [], 0.0
        self.lock = threading.Lock()
        self.inflight = self.max_inflight = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                x0 = body["messages"][-1]["content"]
                with fake.lock:
                    fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    steps = fake.script.get(x0, ["ok"])
                    n = sum(1 for r in fake.requests if r["body"]["messages"][-1]["content"] == x0)
                    action = steps[min(n, len(steps)) - 1]
                    fake.inflight += 1
                    fake.max_inflight = max(fake.max_inflight, fake.inflight)
                try:
                    time.sleep(fake.delay)
                    if self.headers.get("Authorization") != f"Bearer {fake.key}" or action == 401:
                        return self._send(
                            401, {"error": {"message": "Incorrect API key", "type": "invalid_request_error"}}
                        )
                    if isinstance(action, int):
                        headers = {"retry-after-ms": "10"} if action == 429 else {}
                        return self._send(
                            action, {"error": {"message": f"status {action}", "type": "server_error"}}, headers
                        )
                    content = good_answer(x0) if action == "ok" else "Sorry, I can't help with that."
                    self._send(
                        200,
                        {
                            "id": "chatcmpl-1",
                            "object": "chat.completion",
                            "created": 0,
                            "model": body["model"],
                            "choices": [
                                {
                                    "index": 0,
                                    "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": content},
                                }
                            ],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                        },
                    )
                finally:
                    with fake.lock:
                        fake.inflight -= 1

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def count(self, x0: str | None = None) -> int:
        with self.lock:
            return sum(1 for r in self.requests if x0 is None or r["body"]["messages"][-1]["content"] == x0)


@pytest.fixture
def llm_server(monkeypatch):
    key = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    fake = FakeLLM(key)
    fake.thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def fast_llm(url: str, cache: Path, **kw) -> LlmConfig:
    return LlmConfig(
        base_url=url, cache_dir=str(cache), max_retries=1, attempts=2, retry_backoff_s=0.01, timeout_s=10, **kw
    )


def assert_key_absent(key: str, *roots: Path) -> int:
    scanned = 0
    for root in roots:
        for f in [root] if root.is_file() else root.rglob("*"):
            if f.is_file():
                scanned += 1
                assert key.encode() not in f.read_bytes(), f"API key found in {f}"
    return scanned


def test_llm_source_parsing_retries_fallback_and_cache(llm_server, tmp_path):
    ok, malformed, limited, broken = (
        "a photo of two cats",
        "a photo of three dogs",
        "a photo of a horse and a cow",
        "a photo of four birds",
    )
    llm_server.script = {malformed: ["malformed"], limited: [429, "ok"], broken: [500]}
    cfg = fast_llm(llm_server.url, tmp_path / "cache")
    sets = {s.x0: s for s in LlmSource(cfg).generate([ok, malformed, limited, broken])}

    assert sets[ok].source == "llm" and sets[ok].prompts == GOOD(ok) and sets[ok].api_calls == 1
    assert sets[limited].source == "llm" and sets[limited].prompts == GOOD(limited)
    assert llm_server.count(limited) == 2  # the 429 was retried by the openai client
    assert sets[malformed].source == "rules" and sets[malformed].prompts == contrast(malformed)
    assert "unparseable answer" in sets[malformed].note and llm_server.count(malformed) == cfg.attempts
    assert sets[broken].source == "rules" and sets[broken].prompts == contrast(broken)
    assert "HTTP 500" in sets[broken].note and llm_server.count(broken) == cfg.attempts * (1 + cfg.max_retries)

    first = llm_server.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == f"Bearer {llm_server.key}"
    body = first["body"]
    assert body["temperature"] == 0 and body["frequency_penalty"] == 0.2 and body["model"] == cfg.model
    assert body["messages"][0]["role"] == "system" and body["messages"][-1]["content"] == ok

    cache = AnswerCache(cfg.cache_dir)
    assert len(cache) == 3  # ok, limited (answers) and malformed (unparseable); the 500s are not cached
    statuses = sorted(r["status"] for r in cache.records.values())
    assert statuses == ["ok", "ok", "unparseable"]

    # a rerun asks only for what failed in transport; cached answers cost no request
    before = llm_server.count()
    again = {s.x0: s for s in LlmSource(cfg).generate([ok, malformed, limited])}
    assert llm_server.count() == before
    assert all(s.cached and s.api_calls == 0 for s in again.values())
    assert again[ok].prompts == GOOD(ok) and again[malformed].source == "rules"
    LlmSource(cfg).generate([broken])
    assert llm_server.count() == before + cfg.attempts * (1 + cfg.max_retries)

    # another model or parameter is another cache key
    other = LlmSource(cfg.model_copy(update={"frequency_penalty": 0.0})).generate([ok])[0]
    assert not other.cached and other.api_calls == 1
    assert assert_key_absent(llm_server.key, tmp_path) >= 1


def test_llm_cache_survives_a_torn_line(tmp_path):
    cache = AnswerCache(tmp_path)
    cache.put({"key": "k1", "prompts": ["a"]})
    with open(cache.path, "a") as f:
        f.write('{"key": "k2", "prom')  # a crash in the middle of a write
    cache = AnswerCache(tmp_path)
    assert "k1" in cache and "k2" not in cache
    cache.put({"key": "k3", "prompts": ["b"]})
    assert set(AnswerCache(tmp_path).records) == {"k1", "k3"}


def test_llm_without_fallback_and_fatal_errors(llm_server, tmp_path):
    llm_server.script = {"a photo of a cat": ["malformed"], "bad key": [401], "no model": [404]}
    cfg = fast_llm(llm_server.url, tmp_path / "c", fallback=False)
    s = LlmSource(cfg).one("a photo of a cat")
    assert s.prompts == [] and s.source == "llm" and "unparseable" in s.error
    with pytest.raises(LlmError, match="refused the API key from \\$OPENAI_API_KEY") as err:
        LlmSource(cfg).one("bad key")
    assert llm_server.key not in str(err.value)
    with pytest.raises(LlmError, match=f"does not serve model '{cfg.model}'"):
        LlmSource(cfg).one("no model")
    assert llm_server.count("bad key") == 1 and llm_server.count("no model") == 1  # not retried


def test_example_config_loads_and_cli_errors_name_the_key(tmp_path, capsys):
    from tn_ray.cli import main
    from tn_ray.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "sweeps" / "prompts_llm.yaml", SynthesisConfig)
    assert cfg.source == "llm" and cfg.sources.llm.frequency_penalty == 0.2 and cfg.workers == 4
    assert main(["prompts", "synthesize", "--out", str(tmp_path / "x.json")]) == 2
    assert "key 'input'" in capsys.readouterr().err
    assert main(["prompts", "synthesize", "--input", "a", "--out", "b", "--source", "magic"]) == 2
    assert "unknown source 'magic'" in capsys.readouterr().err


def test_requests_per_minute_is_shared_by_the_workers(llm_server, tmp_path):
    waits = []
    src = LlmSource(fast_llm(llm_server.url, tmp_path, requests_per_minute=120), workers=4)
    src.sleep = waits.append  # record the pauses instead of sleeping
    assert src.min_interval_s == pytest.approx(60 * 4 / 120)
    src.generate(["a photo of two cats", "a photo of three cats", "a photo of four cats"])
    assert llm_server.count() == 3 and len(waits) == 2  # no pause before the first request
    assert all(0 < w <= src.min_interval_s for w in waits)


def test_openai_base_url_variable_is_honoured(llm_server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", llm_server.url)
    s = LlmSource(LlmConfig(cache_dir=str(tmp_path), max_retries=0)).one("a photo of two cats")
    assert s.source == "llm" and llm_server.count() == 1


def test_missing_key_errors_only_when_the_llm_is_needed(llm_server, tmp_path, monkeypatch, ray_session):
    inp = tmp_path / "in.txt"
    inp.write_text("a photo of two cats\n")
    llm = fast_llm(llm_server.url, tmp_path / "cache")
    cfg = SynthesisConfig(
        input=str(inp), out=str(tmp_path / "o.json"), source="llm", workers=1, sources=SourcesConfig(llm=llm)
    )
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(MissingApiKeyError, match="OPENAI_API_KEY is not set"):
        synthesize(cfg)
    assert llm_server.count() == 0
    rules = synthesize(cfg.model_copy(update={"source": "rules"}))  # rules never need a key
    assert json.loads(rules["sets"].read_text()) == {"a photo of two cats": contrast("a photo of two cats")}
    # once the answer is cached the key is not needed either
    LlmSource(llm, api_key=SecretStr(llm_server.key)).one("a photo of two cats")
    n = llm_server.count()
    paths = synthesize(cfg)
    assert llm_server.count() == n
    assert json.loads(paths["sets"].read_text()) == {"a photo of two cats": GOOD("a photo of two cats")}
    # a refused key inside a Ray actor stops the run with one clear line, without the key
    inp.write_text("a photo of two cats\na photo of a dog\n")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-" + llm_server.key[-8:])
    with pytest.raises(LlmError, match="refused the API key") as err:
        synthesize(cfg)
    assert "\n" not in str(err.value) and "sk-wrong" not in str(err.value)
    assert llm_server.count("a photo of a dog") == 1


# ------------------------------------------------------------------------------------------
# the Ray-sharded command
# ------------------------------------------------------------------------------------------


def test_read_prompts_formats_and_errors(tmp_path, tia2_dir):
    (tmp_path / "a.txt").write_text("x one\n\n  x   two \nx one\n")
    assert read_prompts(tmp_path / "a.txt") == ["x one", "x two"]
    (tmp_path / "b.json").write_text(json.dumps({"p": ["q"], "r": []}))
    assert read_prompts(tmp_path / "b.json") == ["p", "r"]
    labels = read_prompts(tia2_dir / "human_annotations" / "human_labels_counting.json")
    assert len(labels) == 150
    (tmp_path / "c.json").write_text(json.dumps(["ok", 3]))
    with pytest.raises(ValueError, match="c.json: item 1 is a int"):
        read_prompts(tmp_path / "c.json")
    (tmp_path / "d.json").write_text("{oops")
    with pytest.raises(ValueError, match="d.json: not valid JSON"):
        read_prompts(tmp_path / "d.json")
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        read_prompts(tmp_path / "none.txt")


def test_synthesize_rules_and_released_through_the_cli(tmp_path, tia2_dir, ray_session, capsys):
    from tn_ray.cli import main
    from tn_ray.data.tia2 import load_prompt_sets

    counting = list(load_prompt_sets("counting", tia2_dir))[::30]
    prompts = counting + ["a realistic photo of a deer and a truck", "dogs chasing horses"]
    inp = tmp_path / "prompts.txt"
    inp.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "rules.json"
    assert (
        main(
            [
                "prompts",
                "synthesize",
                "--input",
                str(inp),
                "--source",
                "rules",
                "--out",
                str(out),
                "--workers",
                "2",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    sets = json.loads(out.read_text())
    assert list(sets) == prompts[:-1]  # input order; the unparseable prompt has no set
    assert all(sets[x] == contrast(x) for x in sets)
    report = json.loads((tmp_path / "rules.report.json").read_text())
    assert (
        report["counts_by_source"] == {"rules": len(prompts) - 1}
        and report["failures"][0]["x0"] == "dogs chasing horses"
    )
    assert "1 failures" in capsys.readouterr().out

    out2 = tmp_path / "released.json"
    assert (
        main(
            [
                "prompts",
                "synthesize",
                "--input",
                str(inp),
                "--source",
                "released",
                "--out",
                str(out2),
                "--tia2-dir",
                str(tia2_dir),
            ]
        )
        == 0
    )
    released = json.loads(out2.read_text())
    tia2_sets = {**load_prompt_sets("counting", tia2_dir), **load_prompt_sets("composition", tia2_dir)}
    assert released == {x: clean(x, tia2_sets[x]) for x in prompts[:-1]}
    report = json.loads((tmp_path / "released.report.json").read_text())
    assert "not a prompt of the TIA2 sets" in report["failures"][0]["error"]
    assert main(["prompts", "synthesize", "--input", str(tmp_path / "missing.txt"), "--out", str(out)]) == 2


def test_synthesize_llm_on_ray_bounded_workers_cache_and_no_key_leak(llm_server, tmp_path, ray_session):
    import ray

    prompts = [f"a photo of {n} {animal}" for n in ("two", "three") for animal in ("cats", "dogs", "birds", "frogs")]
    llm_server.script = {prompts[1]: ["malformed"], prompts[2]: [429, "ok"], prompts[3]: [500]}
    llm_server.delay = 0.05
    inp = tmp_path / "in.json"
    inp.write_text(json.dumps(prompts))
    cfg = SynthesisConfig(
        input=str(inp),
        out=str(tmp_path / "out" / "llm.json"),
        source="llm",
        workers=2,
        batch_size=1,
        sources=SourcesConfig(llm=fast_llm(llm_server.url, tmp_path / "cache")),
    )
    paths = synthesize(cfg)
    sets = json.loads(paths["sets"].read_text())
    report = json.loads(paths["report"].read_text())
    assert list(sets) == prompts
    assert llm_server.max_inflight <= 2  # the actor pool bounds requests in flight
    for x in prompts:
        expect_rules = x in (prompts[1], prompts[3])
        assert sets[x] == (contrast(x) if expect_rules else GOOD(x))
        assert report["sources"][x] == ("rules" if expect_rules else "llm")
    assert report["counts_by_source"] == {"llm": 6, "rules": 2} and len(report["fallbacks"]) == 2
    assert report["uncached_before_run"] == 8 and report["failures"] == []
    assert report["api_calls"] == 5 + 1 + 2 + 2  # ok x5, 429 then ok (one call), malformed x2, 500 x2 attempts

    n = llm_server.count()
    again = synthesize(cfg.model_copy(update={"out": str(tmp_path / "out" / "again.json")}))
    assert json.loads(again["sets"].read_text()) == sets
    llm = cfg.sources.llm
    assert llm_server.count() - n == llm.attempts * (1 + llm.max_retries)  # only the 500 prompt asks again
    rerun = json.loads(again["report"].read_text())
    assert rerun["cached"] == 7 and rerun["uncached_before_run"] == 1

    scanned = assert_key_absent(llm_server.key, tmp_path)
    assert scanned >= 5
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # Ray's logs: driver, workers, raylet
    assert logs.is_dir() and assert_key_absent(llm_server.key, logs) > 0


# ------------------------------------------------------------------------------------------
# overlap with the released sets, TIA2 evaluation with rule-built sets
# ------------------------------------------------------------------------------------------


def test_compare_reports_jaccard_per_set(tmp_path, tia2_dir):
    import pandas as pd

    from tn_ray.cli import main

    assert main(["prompts", "compare", "--tia2-dir", str(tia2_dir), "--out", str(tmp_path)]) == 0
    md = (tmp_path / "overlap.md").read_text()
    assert "| counting" in md and "| composition" in md and "jaccard mean" in md
    table = pd.read_csv(tmp_path / "overlap_per_prompt.csv")
    assert len(table) == 450 and (table["n_rules"] > 0).all()
    row = table[table["x0"] == "a realistic photo of three deer"].iloc[0]
    # rules {1,2,4,5,6} deer vs released {1,2,4,5} deer: 4 shared of 5
    assert row["shared"] == 4 and row["jaccard"] == pytest.approx(0.8)
    comp = table[table["x0"] == "a realistic photo of an airplane and an apple"].iloc[0]
    # released: 32 prompts; shared = 2 singles + the 5 quantity pairs written with "and"
    assert comp["shared"] == 7 and comp["jaccard"] == pytest.approx(7 / (56 + 32 - 7))


def test_tia2_eval_with_rule_built_sets(tmp_path, tia2_dir, ray_session):
    from PIL import Image

    from tn_ray.config import ScoringConfig
    from tn_ray.data.tia2 import load_labels
    from tn_ray.experiments.tia2_eval import Tia2EvalConfig, run
    from tn_ray.scoring.matrix import ScoreMatrix

    rng = np.random.default_rng(0)
    for set_name in ("counting", "composition"):
        labels = load_labels(set_name, tia2_dir)
        first = labels["prompt"].drop_duplicates().iloc[:2]
        (tmp_path / "images" / set_name).mkdir(parents=True)
        for image_id in labels[labels["prompt"].isin(first)]["image_id"]:
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / "images" / set_name / image_id
            )
        inp = tmp_path / f"{set_name}.txt"
        inp.write_text("\n".join(first) + "\n")
        synthesize(
            SynthesisConfig(input=str(inp), out=str(tmp_path / f"rules_{set_name}.json"), source="rules", workers=1)
        )

    cfg = Tia2EvalConfig(
        images=str(tmp_path / "images"),
        tia2_dir=str(tia2_dir),
        out=str(tmp_path / "eval"),
        models=["clip:tiny"],
        sets=["counting", "composition"],
        max_prompts=2,
        contrast=str(tmp_path / "rules_{set}.json"),
        scoring=ScoringConfig(batch_size=50),
    )
    paths = run(cfg)
    per_set = Path(paths["per_set_csv"]).read_text()
    assert "counting" in per_set and "composition" in per_set
    matrix = ScoreMatrix.load(next(Path(paths["scores"]).glob("*.parquet")))
    assert len(matrix) == 200
    for prompt, texts, values in zip(matrix.keys["prompt"], matrix.texts, matrix.values):
        assert texts == [prompt, *contrast(prompt)]
        assert np.isfinite(values[: len(texts)]).all() and np.isnan(values[len(texts) :]).all()


def test_contrast_set_and_registry():
    from tn_ray.prompts import SOURCES, register, source_class

    assert set(SOURCES) >= {"released", "rules", "llm"}
    with pytest.raises(KeyError, match="unknown prompt source 'nope'"):
        source_class("nope")
    register("rules-copy", "tn_ray.prompts.rules:RulesSource", "rules")
    try:
        s = build("rules-copy", SourcesConfig(rules=RulesConfig(max_count=3))).one("a photo of a cat")
        assert s.prompts == ["a photo of two cats", "a photo of three cats"]
    finally:
        SOURCES.pop("rules-copy")
    assert ContrastSet("x", ["y"], "rules").ok and not ContrastSet("x").ok


# ---- duplicates and a set's own x0: counted, logged, and kept with dedupe: false ----------------


def test_texts_for_counts_repeats_and_own_x0_and_keeps_them_without_dedupe(tmp_path, caplog):
    from tn_ray.prompts.contrast import load_contrast, texts_for

    path = tmp_path / "sets.json"
    path.write_text(
        json.dumps(
            {
                "a cat": ["two cats", "a dog", "two cats", "a cat"],
                "two dogs": ["three dogs"],
                "a bird": ["a fish", "a fish", "a fish"],
            }
        )
    )
    sets = load_contrast(str(path))
    prompts = ["a cat", "two dogs", "a bird", "a cat"]
    stats: dict = {}
    with caplog.at_level("INFO", logger="tn_ray.prompts.contrast"):
        texts = texts_for(prompts, sets, str(path), stats=stats)
    assert texts == [
        ["a cat", "two cats", "a dog"],
        ["two dogs", "three dogs"],
        ["a bird", "a fish"],
        ["a cat", "two cats", "a dog"],
    ]
    assert stats == {
        "sets": 3,
        "sets_with_duplicates": 2,
        "duplicates": 3,
        "sets_with_x0": 1,
        "dedupe": True,
        "example": "a cat",
    }
    line = " ".join(r.getMessage() for r in caplog.records)
    assert "2 of 3 sets repeat a prompt (3 repeats), 1 hold their own x0; removed" in line and "'a cat'" in line
    kept: dict = {}
    exact = texts_for(prompts, sets, str(path), dedupe=False, stats=kept)
    assert exact[0] == ["a cat", "two cats", "a dog", "two cats", "a cat"] and exact[2] == ["a bird"] + ["a fish"] * 3
    assert kept["duplicates"] == 3 and kept["dedupe"] is False


def test_released_composition_sets_with_repeats_are_counted(tia2_dir):
    from tn_ray.data import tia2
    from tn_ray.prompts.contrast import load_contrast, texts_for

    for name, with_dupes, repeats, with_x0 in [
        ("composition", 32, 41, 0),
        ("comprehensive", 0, 0, 1),
        ("counting", 0, 0, 0),
    ]:
        sets = load_contrast(f"released:{name}", tia2_dir=tia2_dir)
        raw = tia2.load_prompt_sets(name, tia2_dir)  # independent count: list lengths against set sizes
        assert sum(len(xs) != len(set(xs)) for xs in raw.values()) == with_dupes
        stats: dict = {}
        texts = texts_for(list(sets), sets, name, stats=stats)
        assert (stats["sets"], stats["sets_with_duplicates"], stats["duplicates"], stats["sets_with_x0"]) == (
            len(raw),
            with_dupes,
            repeats,
            with_x0,
        )
        exact = texts_for(list(sets), sets, name, dedupe=False)
        assert all(t[1:] == raw[t[0]] for t in exact)  # dedupe: false is the release, exactly
        assert sum(len(t) for t in exact) - sum(len(t) for t in texts) == repeats + with_x0


# ---- the paper's request (Appendix D) as the `paper` preset ------------------------------------


def test_paper_preset_request_for_a_black_colored_car_is_algorithm_1():
    """Algorithm 1 of the paper, transcribed here independently, for Appendix D's example "A black
    colored car" (categories colors and counting): the same messages and parameters."""
    from tn_ray.prompts.llm import request
    from tn_ray.prompts.settings import LlmConfig

    system = (
        "Create captions that are different from the original input used for the text-to-image generation model, "
        "referencing the provided failure cases. The new captions should offer perspectives that are distinct "
        "from "
        "the original context of the images. Ensure that each contrasting caption provides a distinct "
        "perspective, "
        "while maintaining the integrity of the image's subject matters. Let's think step by step."
    )
    table19 = {
        "colors": (
            "A blue bird and a brown bear.",
            [
                "A pair of bears, one blue and the other brown.",
                "A blue bear and a brown bear, no bird in sight.",
                "Two bears, both brown, no blue bird.",
                "Two bears, one brown and the other unexpectedly blue.",
            ],
        ),
        "counting": (
            "Four cars on the street.",
            [
                "Two cars on the street.",
                "Three cars on the street.",
                "Five cars on the street.",
                "Six cars on the street.",
            ],
        ),
    }
    expected_system = system
    for category in ("colors", "counting"):
        original, captions = table19[category]
        expected_system += (
            category
            + "[\nOriginal prompt:"
            + original
            + "\nContrasting captions:"
            + "".join(f"{i}. {c}\n" for i, c in enumerate(captions, 1))
            + "]\n"
        )
    cfg = LlmConfig(preset="paper")
    assert (cfg.model, cfg.temperature, cfg.frequency_penalty) == ("gpt-4-0613", 0.0, 0.2)
    req = request(cfg, "A black colored car")
    assert req == {
        "model": "gpt-4-0613",
        "temperature": 0.0,
        "frequency_penalty": 0.2,
        "messages": [
            {"role": "system", "content": expected_system},
            {"role": "user", "content": "A black colored car"},
        ],
    }
    assert LlmConfig(preset="paper", model="local-llm").model == "local-llm"  # keys given win over the preset
    assert "max_tokens" in request(LlmConfig(), "A black colored car")  # the tn_ray request is unchanged


def test_paper_examples_are_table_19_verbatim():
    """Every Table 19 input and output appears in the paper's text as printed (quotes as in the PDF)."""
    from tn_ray.prompts.instruction import PAPER_EXAMPLES, PAPER_SYSTEM

    paper = next(Path(__file__).resolve().parents[2].joinpath("shared", "papers").glob("000_*.txt"), None)
    assert paper is not None, "the paper's text (000_*.txt) is not in ../shared/papers beside the checkout"
    text = paper.read_text()
    assert f'"content": "{PAPER_SYSTEM}"' in text
    assert set(PAPER_EXAMPLES) == {
        "text",
        "style",
        "composition",
        "counting",
        "creative",
        "location",
        "colors",
        "spatial",
    }
    for category, [example] in PAPER_EXAMPLES.items():
        outputs = ", ".join(f"\u201c{c}\u201d" for c in example["proper_candidates"])
        assert f"Input: \u201c{example['original_prompt']}\u201d\nOutput: [{outputs}]" in text, category
