"""The auto-interp LLM path against a loopback server that speaks the OpenAI chat-completions protocol."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lm_fixtures import send_json
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
        send_json(self, body)

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


class RuleJudge(BaseHTTPRequestHandler):
    """A judge that knows the latent's rule (fires on 'cat'), or guesses (mode 'guess'), or garbles some replies."""

    mode = "rule"

    def do_POST(self):  # noqa: N802
        import random

        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = req["messages"][-1]["content"]
        rnd = random.Random(prompt)
        if "What does the latent detect" in prompt:
            content = {"explanation": "the token cat"}
        elif "TOKENS: " in prompt:
            toks = json.loads(prompt.split("TOKENS: ", 1)[1])
            acts = [10 if t == "cat" else 0 for t in toks] if self.mode != "guess" else [rnd.random() for _ in toks]
            if self.mode == "garble" and rnd.random() < 0.3:
                acts = acts[:-1]  # one activation short: malformed
            content = {"activations": acts}
        else:
            toks = json.loads(prompt.split("CONTEXT: ", 1)[1])
            fires = "cat" in toks if self.mode != "guess" else rnd.random() < 0.5
            content = {"fires": fires, "confidence": 0.9}
        send_json(self, {"choices": [{"message": {"content": json.dumps(content)}}]})

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("mode", ["rule", "guess", "garble"])
def test_explain_simulate_detect_scores_a_latent_whose_rule_is_known(tmp_path, mode):
    import numpy as np

    from progsae.interp.autointerp import ChatJudge, score_latent

    RuleJudge.mode = mode
    srv = ThreadingHTTPServer(("127.0.0.1", 0), RuleJudge)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        chat = ChatClient(f"http://127.0.0.1:{srv.server_address[1]}/v1", model="m", cache_dir=tmp_path / mode)
        g = np.random.default_rng(1)
        ctx = [list(g.choice(["the", "cat", "sat", "on", "mat", "dog", "ran"], 10)) for _ in range(60)]
        examples = [(c, [3.0 if t == "cat" else 0.0 for t in c]) for c in ctx]
        r = score_latent(ChatJudge(chat), examples[:10], examples[10:])
    finally:
        srv.shutdown()
    assert r["explanation"] == "the token cat" and r["error"] is None
    if mode == "rule":
        assert r["simulation"] == pytest.approx(1.0) and r["detection_bacc"] == 1.0 and r["malformed"] == 0
    elif mode == "guess":
        assert abs(r["simulation"]) < 0.15 and abs(r["detection_bacc"] - 0.5) < 0.2
    else:  # some simulations malformed: counted, and the rest still scored
        assert 0 < r["malformed"] < 50 and r["simulation"] == pytest.approx(1.0)


@pytest.mark.slow  # ~40 s: the embedded 135M model on the CPU
def test_the_embedded_model_judges_from_its_probabilities_well_formed_batched_and_cached(tmp_path):
    pytest.importorskip("gguf")
    from progsae.interp.autointerp import score_latent
    from progsae.interp.local import LocalJudge

    judge = LocalJudge("smollm2-135m", cache_dir=tmp_path, batch_size=2)
    a, b, c = ["In", " the", " beginning"], [" And", " God", " said", " ,", " Let"], [" light", "\n"]
    sims = judge.simulate("the word God", [a, b, c])
    assert [len(s) for s in sims] == [3, 5, 2] and all(0 <= v <= 9 for s in sims for v in s)
    # padding in a batch changes nothing: each context alone (a fresh judge, no cache) gives the same numbers
    alone = LocalJudge("smollm2-135m", cache_dir=tmp_path / "other", batch_size=1)
    assert alone.simulate("the word God", [b])[0] == pytest.approx(sims[1], abs=1e-4)
    det = judge.detect("the word God", [a, b])
    assert all(0 < p < 1 and said == (p > 0.5) for said, p in det)
    assert alone.detect("the word God", [b])[0][1] == pytest.approx(det[1][1], abs=1e-5)
    calls = judge.calls
    assert judge.simulate("the word God", [c, a]) == [sims[2], sims[0]] and judge.calls == calls  # from the cache
    examples = [(b, [0.0, 2.0, 0.0, 0.0, 0.0])]
    r = score_latent(judge, examples, [(a, [0.0, 0.0, 0.0]), (b, [0.0, 1.5, 0.0, 0.0, 0.0])])
    assert isinstance(r["explanation"], str) and r["explanation"] and r["malformed"] == 0
    assert r["detection_auroc"] is not None and -1 <= r["simulation"] <= 1


def _planted(rng, n, rule):
    """n contexts of 16 tokens drawn from a small vocabulary (leading spaces, as a tokenizer writes them), and a
    latent that fires with a random strength where rule(tokens, i) holds."""
    vocab = [" the", " cat", " sat", " on", " mat", " dog", " ran", " a", "\n"]
    ctx = [list(rng.choice(vocab, 16)) for _ in range(n)]
    return [(c, [float(rule(c, i)) * rng.uniform(1, 3) for i in range(len(c))]) for c in ctx]


def test_the_lexical_judge_explains_a_planted_token_or_bigram_exactly_and_simulates_its_pearson():
    import numpy as np

    from progsae.interp.autointerp import score_latent
    from progsae.interp.lexical import LexicalJudge

    rng, judge = np.random.default_rng(0), LexicalJudge()
    cat = _planted(rng, 40, lambda c, i: c[i] == " cat")
    r = score_latent(judge, cat[:10], cat[10:])
    assert r["explanation"] == 'the word "cat"' and r["malformed"] == 0
    named = np.concatenate([[t.strip() == "cat" for t in c] for c, _ in cat[10:]])  # the lookup, independently
    acts = np.concatenate([a for _, a in cat[10:]])
    assert r["simulation"] == pytest.approx(np.corrcoef(named, acts)[0, 1], abs=1e-12) and r["simulation"] < 1
    assert r["detection_auroc"] == 1.0
    # fires on " dog" after " the" only; " dog" also follows other words in the explanation contexts
    pair = _planted(rng, 40, lambda c, i: i > 0 and c[i - 1] == " the" and c[i] == " dog")
    assert any(c[i] == " dog" and c[i - 1] != " the" for c, _ in pair[:10] for i in range(1, 16))
    r = score_latent(judge, pair[:10], pair[10:])
    assert r["explanation"] == 'the words ["the", "dog"]'
    named = np.concatenate([[i > 0 and (c[i - 1].strip(), c[i].strip()) == ("the", "dog") for i in range(16)]
                            for c, _ in pair[10:]])  # fmt: skip
    acts = np.concatenate([a for _, a in pair[10:]])
    assert r["simulation"] == pytest.approx(np.corrcoef(named, acts)[0, 1], abs=1e-12)
    # a latent that fired once still gets its best lookup (the held-out contexts then score it)
    assert judge.explain([([" a", " mat", " sat", " on"], [0.0, 0.0, 2.0, 0.0])]) == ('the word "sat"', None)
    # a lookup that names no held-out token predicts nothing: simulation 0, not unscored
    absent = [(["x"] * 4, [0.0, 1.0, 0.0, 0.0]), (["y"] * 4, [0.0] * 4)]
    assert score_latent(judge, [], absent, explanation='the word "cat"')["simulation"] == 0.0
    assert score_latent(judge, [], absent, explanation="a cat, roughly")["malformed"] == 4  # not its form


def test_the_lexical_judge_passes_the_judge_check_and_scores_shuffled_activations_near_zero(
    tiny_lm_dir, text_corpus, tmp_path
):
    import numpy as np

    from progsae.data import ActivationDir
    from progsae.data.extract import ExtractConfig, extract
    from progsae.data.lm import load_lm
    from progsae.interp.autointerp import score_latent
    from progsae.interp.lexical import LexicalJudge
    from progsae.interp.records import TextRows
    from progsae.interp.study import WINDOW, judge_check

    model, tok, _ = load_lm(str(tiny_lm_dir))
    cfg = ExtractConfig(model=str(tiny_lm_dir), layer=1, tokens=420, corpus=str(text_corpus(4)), ctx_len=16)
    rows = TextRows(ActivationDir(extract(cfg, tmp_path / "acts", model, tok, "tiny", progress=False)), 420, None, tok)
    check = judge_check(LexicalJudge(), rows)
    assert len(check["latents"]) == 3 and all(x["malformed"] == 0 for x in check["latents"])
    assert check["simulation"] > 0.95 and check["detection_auroc"] > 0.95
    # a latent firing on one word, its activations shuffled over every token: nothing left to look up
    rng = np.random.default_rng(0)
    word = int(rows.token_ids[np.argmax(np.bincount(rows.token_ids.numpy()))])
    windows = [rows.window(r, *WINDOW) for r in range(0, rows.n, 20)]
    toks = [[rows.text(int(rows.token_ids[i])) for i in w] for w in windows]
    acts = [[float(rows.token_ids[i] == word) for i in w] for w in windows]
    half = len(windows) // 2
    examples = list(zip(toks, acts, strict=True))
    planted = score_latent(LexicalJudge(), examples[:half], examples[half:])
    assert planted["explanation"] == f'the word "{rows.text(word).strip()}"' and planted["simulation"] > 0.95
    sims = []
    for _ in range(10):
        flat = rng.permutation(np.concatenate(acts))
        shuffled = np.split(flat, np.cumsum([len(a) for a in acts])[:-1])
        examples = [(t, a.tolist()) for t, a in zip(toks, shuffled, strict=True)]
        sims.append(score_latent(LexicalJudge(), examples[:half], examples[half:])["simulation"])
    assert all(s is not None for s in sims) and abs(np.mean(sims)) < 0.1 and max(map(abs, sims)) < 0.3


def test_the_findings_are_decided_by_a_judge_that_passes_its_check_and_say_which():
    import numpy as np

    from progsae.study.findings import interpretability_findings as findings

    N, rng = 64, np.random.default_rng(0)

    def scores(level, slope):
        return [{"latent": i, "simulation": level - slope * i / N + rng.normal(0, 0.02)} for i in range(0, N, 2)]

    llm = {"van": {"scores": scores(0.6, 0.0)}, "mat": {"scores": scores(0.8, 0.0)}}  # the reverse of the paper
    lex = {"van": {"scores": scores(0.8, 0.0)}, "mat": {"scores": scores(0.6, 0.4)}}  # the paper's findings
    good, weak = {"judge": "llm", "simulation": 0.9}, {"judge": "llm", "simulation": 0.1}
    lexical = {"judge": "lookup", "check": {"judge": "lookup", "simulation": 1.0}, "saes": lex}
    by_llm = findings(llm, "van", ["mat"], N, good, 500, lexical=lexical)
    assert [x["verdict"] for x in by_llm] == ["not reproduced", "not reproduced"]  # the LLM's scores decide
    assert all("decided by judge llm (simulation on known-rule latents: judge llm 0.90, the lexical judge 1.00)"
               in x["ours"] for x in by_llm)  # fmt: skip
    by_lexical = findings(llm, "van", ["mat"], N, weak, 500, lexical=lexical)
    assert [x["verdict"] for x in by_lexical] == ["reproduced (by the lexical judge)"] * 2
    assert all("decided by the lexical judge, lookup (simulation on known-rule latents: judge llm 0.10, the lexical "
               "judge 1.00)" in x["ours"] for x in by_lexical)  # fmt: skip
    shown = re.search(r"mat: ([\d.]+) vs ([\d.]+)", by_lexical[0]["ours"]).groups()  # the lexical judge's means
    assert shown == tuple(f"{np.mean([s['simulation'] for s in lex[n]['scores']]):.3f}" for n in ("van", "mat"))
    both_weak = {**lexical, "check": {"simulation": 0.2}}
    assert all(x["verdict"].startswith("undecided (judge too weak")
               for x in findings(llm, "van", ["mat"], N, weak, 500, lexical=both_weak))  # fmt: skip
