"""A tiny randomly initialised transformers model and tokenizer, built from a config (no download)."""

import torch

TEXT = (
    "In the beginning the model read a few sentences. Every sentence had words, and the words had meaning. "
    "The sparse autoencoder learned features from the residual stream. Some features were frequent and some rare. "
) * 3


def tiny_lm(path, n_layers=3, d=32, seed=0):
    """Save a 3-layer Llama with a word-level tokenizer to `path`; returns (model, tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted(set(TEXT.replace(".", " .").replace(",", " ,").split()))  # includes "." and ","
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=d,
        intermediate_size=2 * d,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def send_json(handler, body) -> None:
    """Answer an HTTP request with `body` as JSON (the loopback chat servers of the tests)."""
    import json

    data = json.dumps(body).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def rule_judge_server() -> str:
    """A loopback OpenAI-compatible judge that explains every latent as 'the word "the"' and then follows the
    explanation it is given exactly (1 on that word, else 0); returns its base URL (a daemon thread serves it)."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Judge(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][-1]["content"]
            if "What does the latent detect" in prompt:
                answer = {"explanation": 'the word "the"'}
            else:
                word = prompt.split('"')[1]
                label = "TOKENS: " if "TOKENS: " in prompt else "CONTEXT: "
                toks = [t.strip() for t in json.loads(prompt.split(label, 1)[1])]
                if label == "TOKENS: ":
                    answer = {"activations": [int(t == word) for t in toks]}
                else:
                    answer = {"fires": word in toks, "confidence": 1.0}
            send_json(self, {"choices": [{"message": {"content": json.dumps(answer)}}]})

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{srv.server_address[1]}/v1"
