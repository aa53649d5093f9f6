"""Tiny CEPE model + character tokenizers, and a real uvicorn server on a free loopback port."""

from __future__ import annotations

import contextlib
import socket
import string
import threading
import time

import httpx
import uvicorn
from conftest import VOCAB, tiny_cepe
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from cepe.serving import ServeConfig, create_app

DECODER_CHARS = "".join(chr(c) for c in range(32, 32 + VOCAB - 4))  # ids 4..95 after 4 specials
ENCODER_CHARS = string.ascii_lowercase + string.digits + " .,;:!?'\"-()\n"  # tiny_bert has 80 ids


def char_tokenizer(chars: str, specials: dict[str, str], lowercase: bool = False) -> PreTrainedTokenizerFast:
    """One token per character; `specials` maps role -> token (ids first, in the dict's order)."""
    vocab = {tok: i for i, tok in enumerate(specials.values())}
    vocab.update({c: len(specials) + i for i, c in enumerate(chars)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


class NullMetrics:
    """Stands in for the server's metrics where a test drives the engine directly."""

    def add(self, *a):
        pass

    def generated(self, n):
        pass


def tiny_serving_model(init: str = "copy"):
    """tiny_cepe (llama decoder, 96 ids; BERT encoder, 80 ids; chunks of 8) with both tokenizers."""
    model = tiny_cepe("llama", "bert", chunk_size=8, init=init)
    model.tokenizer = char_tokenizer(
        DECODER_CHARS, {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    )
    model.encoder_tokenizer = char_tokenizer(
        ENCODER_CHARS,
        {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"},
        lowercase=True,
    )
    assert len(model.tokenizer) == VOCAB
    return model


def slow_down(model, seconds: float):
    """Make every decoder forward (one prefill or one token) take at least `seconds`; returns the hook handle."""
    return model.decoder.register_forward_pre_hook(lambda module, args: time.sleep(seconds))


@contextlib.contextmanager
def live_server(model, tmp_path, on_app=None, **config):
    """A real uvicorn server in a thread on 127.0.0.1:<free port>; yields its base URL
    (`on_app(app)` is called with the application before it serves, for tests that reach inside)."""
    config.setdefault("model_name", "tiny")
    config.setdefault("store_dir", str(tmp_path / "store"))
    app = create_app(model, ServeConfig(**config))
    if on_app is not None:
        on_app(app)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=2)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive(), "server thread did not stop"


def metric(url: str, name: str, headers: dict | None = None, **labels) -> float:
    """Sum of a Prometheus sample `cepe_<name>` (optionally matching labels) from GET /metrics."""
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(f"cepe_{name}") and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            if key.split("{")[0] != f"cepe_{name}":
                continue
            if all(f'{k}="{v}"' in key for k, v in labels.items()):
                total += float(value)
    return total
