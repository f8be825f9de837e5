"""The hand-off to ComfyUI and A1111: install into models/loras, link the base, queue in a running ComfyUI."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from browser import browser_page, running_app, wait_for
from gradio_client import Client
from gradio_client.exceptions import AppError

from lora_gradio import comfyui
from lora_gradio.cli import main
from lora_gradio.demo.shapes import make_demo_dataset
from lora_gradio.errors import UserError
from lora_gradio.models import resolve_base
from lora_gradio.request import GenerateRequest

COMFY_ERROR = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                         "details": "", "extra_info": {}},
               "node_errors": {"2": {"errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                                 "details": "lora_name: 'anna.safetensors' not in []",
                                                 "extra_info": {}}],
                                     "dependent_outputs": ["8"], "class_type": "LoraLoader"}}}


class FakeComfyUI:
    """A local HTTP server with ComfyUI's /prompt: it records each body and answers as told."""

    def __init__(self, status=200, answer=None):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                received.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
                body = json.dumps(answer or {"prompt_id": "f00d", "number": 3, "node_errors": {}}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                return None

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def comfy():
    server = FakeComfyUI()
    yield server
    server.close()


@pytest.fixture
def comfy_error():
    server = FakeComfyUI(400, COMFY_ERROR)
    yield server
    server.close()


def nodes():
    return comfyui.build_graph(GenerateRequest("ohwx, portrait", lora="anna.safetensors"), "base.safetensors", 512,
                               512)


def test_queue_posts_the_api_prompt(comfy):
    answer = comfyui.queue(comfy.url, comfyui.api_prompt(nodes()))
    assert answer == f"Queued in ComfyUI at {comfy.url}: prompt f00d, number 3."
    ((path, body),) = comfy.received
    assert path == "/prompt" and body["prompt"] == comfyui.api_prompt(nodes()) and body["client_id"]


def test_comfyuis_error_comes_back_word_for_word(comfy_error):
    with pytest.raises(UserError) as info:
        comfyui.queue(comfy_error.url, comfyui.api_prompt(nodes()))
    assert str(info.value) == ("ComfyUI refused the workflow (HTTP 400): Prompt outputs failed validation; node 2 "
                               "(LoraLoader): Value not in list: lora_name: 'anna.safetensors' not in []")


def test_a_comfyui_that_is_not_running_is_named():
    with pytest.raises(UserError, match=r"ComfyUI does not answer at http://127.0.0.1:9 .*--comfyui-url"):
        comfyui.queue("http://127.0.0.1:9", {})


def test_install_copies_once_asks_before_replacing_and_notes_the_base(tmp_path, capsys):
    comfy = tmp_path / "ComfyUI"
    (comfy / "models" / "checkpoints").mkdir(parents=True)
    lora = tmp_path / "anna.safetensors"
    lora.write_bytes(b"lora weights")
    base = tmp_path / "dreamshaper_8.safetensors"
    base.write_bytes(b"checkpoint")
    args = ["install", str(lora), "--comfyui", str(comfy), "--base", str(base)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Copied to ComfyUI's models/loras as anna.safetensors" in out
    assert "dreamshaper_8.safetensors is not in ComfyUI's models/checkpoints" in out and "--link-base" in out
    assert (comfy / "models" / "loras" / "anna.safetensors").read_bytes() == b"lora weights"
    assert main(args) == 0 and "(the same file); nothing to do" in capsys.readouterr().out
    lora.write_bytes(b"retrained weights")
    assert main(args) == 2 and "already has a different anna.safetensors" in capsys.readouterr().err
    assert (comfy / "models" / "loras" / "anna.safetensors").read_bytes() == b"lora weights"  # kept
    assert main([*args, "--replace", "--link-base"]) == 0
    assert (comfy / "models" / "loras" / "anna.safetensors").read_bytes() == b"retrained weights"
    linked = comfy / "models" / "checkpoints" / "dreamshaper_8.safetensors"
    assert linked.is_symlink() and linked.resolve() == base.resolve()
    assert comfyui.checkpoint_note(resolve_base(str(base)), comfy / "models") is None


def test_inspect_from_the_command_line(tmp_path, capsys):
    from test_lora_files import full_sd15_file

    assert main(["inspect", str(full_sd15_file(tmp_path / "full.safetensors", "kohya"))]) == 0
    out = capsys.readouterr().out
    assert out.startswith("full.safetensors\nLayout: kohya") and "(100%)" in out


def test_the_app_sends_to_comfyui_and_shows_its_queue_error(tmp_path, comfy_error):
    workspace = tmp_path / "workspace"
    comfy = tmp_path / "ComfyUI"
    (comfy / "models").mkdir(parents=True)
    with running_app(workspace, "--comfyui-url", comfy_error.url, "--allow-dir", str(comfy)) as url:
        client = Client(url, verbose=False)
        with pytest.raises(AppError, match="No ComfyUI folder is set"):
            client.predict("loras/none.safetensors", api_name="/comfyui_install")
        client.predict(str(comfy), api_name="/set_models_dir")
        (comfy / "models" / "loras" / "mine.safetensors").write_bytes(b"x")  # already there: the same file
        assert "already in ComfyUI's models/loras" in client.predict("loras/mine.safetensors",
                                                                     api_name="/comfyui_install")
        with pytest.raises(AppError, match=r"'mine.safetensors' is not a readable .safetensors LoRA"):
            client.predict("loras/mine.safetensors", api_name="/inspect_lora")
        with pytest.raises(AppError, match=r"LoRA '/etc/passwd' is not in this workspace"):
            client.predict("/etc/passwd", api_name="/inspect_lora")
        with pytest.raises(AppError, match=r"HTTP 400\): Prompt outputs failed validation; node 2 \(LoraLoader\)"):
            client.predict(prompt="ohwx", lora="loras/mine.safetensors", api_name="/comfyui_queue")
        with browser_page() as page:
            page.goto(url)
            page.get_by_role("tab", name="Test").click()
            page.get_by_text("Use it in ComfyUI, inspect the LoRA").click()
            page.locator("#comfy-queue").click()
            toast = page.locator(".toast-body")
            wait_for(lambda: "ComfyUI refused the workflow (HTTP 400): Prompt outputs failed validation; node 2 "
                     "(LoraLoader): Value not in list: lora_name: 'anna.safetensors' not in []"
                     in toast.first.inner_text(), 30, "ComfyUI's error on the page")
        assert len(comfy_error.received) == 2

        client.predict("shapes", api_name="/create_dataset")
        make_demo_dataset(workspace / "datasets" / "shapes" / "images", count=8)
        settings = {**client.predict("demo", api_name="/preset"), "epochs": 1, "output_name": "shapes"}
        started = client.predict(dataset="shapes", settings=settings, api_name="/train_start")
        wait_for(lambda: client.predict(started["job_id"], 0, api_name="/job_status")["status"] == "done", 120,
                 "training")
        state = client.predict(started["job_id"], 0, api_name="/job_status")
        assert state["log"][-1] == "ComfyUI: Copied to ComfyUI's models/loras as shapes-ema.safetensors: pick it in " \
                                   "the Load LoRA node (refresh the page)."  # the run's LoRA: the preset's average
        installed = (comfy / "models" / "loras" / "shapes-ema.safetensors").read_bytes()
        assert installed == (workspace / "outputs" / started["run"] / "shapes-ema.safetensors").read_bytes()
