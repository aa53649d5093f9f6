"""`cepe serve` on the command line; with the real assets, the real server process end to end."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from cepe import assets
from cepe.cli import build_parser, main
from cepe.serving.cli import default_model_name


def test_parser_defaults_are_loopback_and_bounded():
    args = build_parser().parse_args(["serve", "--init", "zero"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.func.__name__ == "serve"
    assert args.max_queue > 0 and args.max_tokens > 0 and args.timeout > 0
    assert args.cuda_graphs == "auto"  # captured steps wherever there is a CUDA device
    assert args.prefill_share == 0.5 and args.switch_interval_ms == 0.1 and args.store_format is None
    assert args.sdpa == "auto"  # PyTorch's kernel choice unless told
    assert args.encoder_compile == "never"  # a first long upload must not wait for a compilation
    assert default_model_name(args) == "cepe-smollm2-135m-minilm-l6-zero"
    assert default_model_name(build_parser().parse_args(["serve", "--adapter", "/x/my-adapter"])) == "my-adapter"
    derived = build_parser().parse_args(["serve", "--init", "copy", "--encoder", "decoder"])
    assert default_model_name(derived) == "cepe-smollm2-135m-decoder-copy"
    assert default_model_name(build_parser().parse_args(["serve"])) == "cepe-smollm2-135m"  # the released adapter


def test_bad_flags_fail_before_loading_anything(capsys):
    assert main(["serve", "--init", "zero", "--max-queue", "0"]) == 2
    assert "--max-queue must be positive" in capsys.readouterr().err
    assert main(["serve", "--adapter", "/no/such/adapter"]) == 2
    assert main(["serve", "--init", "zero", "--prefill-share", "0"]) == 2
    assert "--prefill-share must be in (0, 1]" in capsys.readouterr().err
    assert main(["serve", "--init", "zero", "--switch-interval-ms", "-1"]) == 2
    assert "--switch-interval-ms must be positive" in capsys.readouterr().err
    assert sys.getswitchinterval() == pytest.approx(0.005)  # refused before anything was changed


@pytest.mark.real
@pytest.mark.parametrize("worker", ["thread", "process"])
def test_real_server_process_answers_with_a_stored_document(tmp_path, worker):
    if not (assets.is_installed("smollm2-135m") and assets.is_installed("minilm-l6")):
        pytest.skip("assets not installed: run `cepe assets`")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "cepe.cli", "serve", "--init", "zero", "--port", str(port),
           "--store", str(tmp_path / "store"), "--threads", "1", "--max-tokens", "8", "--worker", worker]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.5)
        doc = httpx.post(
            f"{url}/v1/contexts", json={"text": "Emma Woodhouse, handsome, clever, and rich."}, timeout=60
        ).json()
        oa = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        out = oa.chat.completions.create(model="cepe-smollm2-135m-minilm-l6-zero", max_tokens=4, temperature=0,
                                         messages=[{"role": "user", "content": "What is the capital of France?"}],
                                         extra_body={"context": [doc["id"]]})
        assert out.choices[0].message.content.strip() and out.usage.completion_tokens <= 4
        with pytest.raises(openai.BadRequestError):
            oa.completions.create(model="cepe-smollm2-135m-minilm-l6-zero", prompt="x", max_tokens=9)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    lines = (tmp_path / "server.log").read_text().splitlines()
    assert any('"event": "request"' in line for line in lines)  # structured logs


def test_the_switch_interval_is_set_before_the_app_so_a_process_worker_inherits_it(monkeypatch):
    import cepe.serving.app as app_module
    import cepe.serving.cli as serve_cli
    import cepe.serving.metrics as metrics

    seen = {}

    def fake_create_app(model, config):
        seen["interval"] = sys.getswitchinterval()  # what Service hands a process worker's child
        raise SystemExit(0)

    monkeypatch.setattr(app_module, "create_app", fake_create_app)
    monkeypatch.setattr(serve_cli, "load_model", lambda args: None)
    monkeypatch.setattr(metrics, "setup_json_logging", lambda: None)  # leave this process's logging alone
    before = sys.getswitchinterval()
    try:
        with pytest.raises(SystemExit):
            main(["serve", "--init", "zero", "--switch-interval-ms", "0.3"])
    finally:
        sys.setswitchinterval(before)
    assert seen["interval"] == pytest.approx(0.3e-3)


def test_the_server_sets_the_models_encoder_compile_setting(tmp_path):
    """`cepe serve` keeps the encoder eager unless told (the model's own default is `auto`)."""
    from cepe.serving.service import Service, ServeConfig
    from tests.serving.serving_harness import tiny_serving_model

    model = tiny_serving_model()
    assert model.config.encoder_compile == "auto"
    Service(model, ServeConfig(store_dir=str(tmp_path / "a")))
    assert model.config.encoder_compile == "never"
    Service(model, ServeConfig(store_dir=str(tmp_path / "b"), encoder_compile="always"))
    assert model.config.encoder_compile == "always"
    with pytest.raises(ValueError, match="encoder_compile"):
        Service(model, ServeConfig(store_dir=str(tmp_path / "c"), encoder_compile="fast"))


def test_the_server_sets_top_k_cross_attention_when_asked(tmp_path):
    """--cross-attn-topk K|off reaches the model; without it the adapter's own setting stays."""
    from cepe.serving.service import Service, ServeConfig
    from tests.serving.serving_harness import tiny_serving_model

    assert build_parser().parse_args(["serve", "--init", "zero", "--cross-attn-topk", "16"]).cross_attn_topk == 16
    assert build_parser().parse_args(["serve", "--init", "zero", "--cross-attn-topk", "off"]).cross_attn_topk == "off"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--init", "zero", "--cross-attn-topk", "0"])
    model = tiny_serving_model()
    model.config.cross_attn_topk = 8  # as an adapter trained with top-k records it
    Service(model, ServeConfig(store_dir=str(tmp_path / "a")))
    assert model.config.cross_attn_topk == 8
    Service(model, ServeConfig(store_dir=str(tmp_path / "b"), cross_attn_topk=16))
    assert model.config.cross_attn_topk == 16
    Service(model, ServeConfig(store_dir=str(tmp_path / "c"), cross_attn_topk="off"))
    assert model.config.cross_attn_topk is None
