"""The app as a stranger with the link meets it: sign-in, the server's files kept private, limits, no stray Stop."""

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from browser import ROOT, running_app
from gradio_client import Client
from gradio_client.exceptions import AppError

from lora_gradio.dataset import make_demo_dataset

USER, PASSWORD = "anna", "s3cret-Passw0rd"


def start_refused(*flags, **extra_env):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LORA_GRADIO_")}, **extra_env}
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *flags], capture_output=True, text=True,
                          timeout=60, env=env)


@pytest.mark.parametrize("flags", [["--share"], ["--host", "0.0.0.0"]])
def test_an_open_server_without_a_password_refuses_to_start(flags, tmp_path):
    done = start_refused(*flags, "--workspace", str(tmp_path / "ws"))
    assert done.returncode == 2
    assert "needs a password: add --auth user:password" in done.stderr and "--insecure-no-auth" in done.stderr
    assert "gradio.live" not in done.stdout + done.stderr and not (tmp_path / "ws").exists()  # nothing started


def test_on_a_space_the_app_listens_publicly_so_it_needs_the_secret(tmp_path):
    done = start_refused("--workspace", str(tmp_path / "ws"), SPACE_ID="someone/lora-gradio")
    assert done.returncode == 2 and "--host 0.0.0.0 would let anyone" in done.stderr


def test_the_readme_is_a_space_card_for_the_pinned_gradio():
    from huggingface_hub import SpaceCard

    card = SpaceCard.load(ROOT / "README.md").data
    pinned = next(line.split("==")[1].split()[0] for line in (ROOT / "requirements.txt").read_text().splitlines()
                  if line.startswith("gradio=="))
    assert (card.sdk, card.sdk_version, card.app_file) == ("gradio", pinned, "app.py")
    assert card.title and card.license == "apache-2.0" and (ROOT / "LICENSE").is_file()
    assert isinstance(card.to_dict()["pinned"], bool)


def test_a_malformed_login_is_named_without_echoing_it(tmp_path):
    done = start_refused("--auth", "no-colon-secret", "--workspace", str(tmp_path / "ws"))
    assert done.returncode == 2 and "--auth #1 is not user:password" in done.stderr
    assert "no-colon-secret" not in done.stderr


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    """The app with a login from the environment and another from a file, and some private files in place."""
    root = tmp_path_factory.mktemp("locked")
    workspace = root / "workspace"
    logins = root / "logins.txt"
    logins.write_text("# team\nben:another-Passw0rd\n")
    with running_app(workspace, "--auth-file", str(logins), env={"LORA_GRADIO_AUTH": f"{USER}:{PASSWORD}"}) as url:
        yield url, workspace, running_app.pid


def test_without_the_password_the_api_refuses_and_with_it_works(locked):
    url, workspace, pid = locked
    with pytest.raises(Exception, match=r"(?i)login|credentials|auth"):
        Client(url, verbose=False).predict(api_name="/cache_status")
    with pytest.raises(Exception, match=r"(?i)login|credentials|auth"):
        Client(url, auth=(USER, "wrong"), verbose=False)
    assert "model" in Client(url, auth=(USER, PASSWORD), verbose=False).predict(api_name="/cache_status")
    assert "model" in Client(url, auth=("ben", "another-Passw0rd"), verbose=False).predict(api_name="/cache_status")
    command_line = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    log = next(workspace.parent.glob("app-*.log")).read_text()
    page = urllib.request.urlopen(url, timeout=10).read().decode()
    for secret in (PASSWORD, "another-Passw0rd"):
        assert secret not in command_line and secret not in log and secret not in page


@pytest.fixture(scope="module")
def client(locked):
    url, workspace, _ = locked
    app = Client(url, auth=(USER, PASSWORD), verbose=False)
    app.predict("mine", api_name="/create_dataset")
    make_demo_dataset(workspace / "datasets" / "mine" / "images")
    return app


def outside_folder(workspace):
    folder = workspace.parent / "private-photos"
    if not folder.exists():
        make_demo_dataset(folder)
    return folder


@pytest.mark.parametrize("target", ["/etc", "outside", "link"])
def test_folders_outside_the_allowed_ones_are_refused_by_rule(client, locked, target):
    _, workspace, _ = locked
    folder = {"/etc": Path("/etc"), "outside": outside_folder(workspace)}.get(target)
    if target == "link":  # a link inside the workspace that leads out of it
        folder = workspace / "datasets" / "sneaky"
        if not folder.exists():
            folder.symlink_to(outside_folder(workspace))
    with pytest.raises(AppError, match=r"outside the folders this app may use.*--allow-dir"):
        client.predict("mine", str(folder), api_name="/import_folder")
    assert len(list((workspace / "datasets" / "mine" / "images").glob("*.png"))) == 8  # nothing imported


def test_a_models_folder_outside_is_refused_and_nothing_is_created(client, locked):
    _, workspace, _ = locked
    target = workspace.parent / "comfy" / "models"
    target.mkdir(parents=True)
    with pytest.raises(AppError, match="outside the folders this app may use"):
        client.predict(str(target), api_name="/set_models_dir")
    assert list(target.iterdir()) == [] and not (workspace / "settings.json").exists()
    with pytest.raises(AppError, match="outside the folders this app may use"):
        client.predict("/nonexistent/ComfyUI", api_name="/set_models_dir")  # no hint whether it exists


def test_resume_of_a_path_and_a_base_outside_are_refused(client, locked, tmp_path):
    _, workspace, _ = locked
    for path in ("../datasets", "..", str(workspace / "datasets")):
        with pytest.raises(AppError, match="is not a run name"):
            client.predict(path, api_name="/delete_run")
    with pytest.raises(AppError, match="is not a lora-gradio run folder"):
        client.predict("test-images", api_name="/delete_run")  # a folder of outputs/ that is not a run
    assert (workspace / "datasets" / "mine").is_dir()
    with pytest.raises(AppError, match="is not a run name"):
        client.predict(run=str(tmp_path / "elsewhere"), api_name="/train_resume")
    settings = client.predict("demo", api_name="/preset")
    with pytest.raises(AppError, match="Base model '/etc/passwd' is outside the folders"):
        client.predict(dataset="mine", base="/etc/passwd", settings=settings, api_name="/train_start")
    with pytest.raises(AppError, match="outside the folders"):
        client.predict(prompt="x", steps=2, base="/etc/passwd", api_name="/generate")


def test_a_job_file_cannot_smuggle_in_a_base_or_data_from_outside(client, locked):
    import json

    _, workspace, _ = locked
    run = workspace / "outputs" / "forged"
    run.mkdir(parents=True)
    (run / "resume-state.pt").write_bytes(b"")
    job = {"config": {}, "base": {"kind": "single_file", "location": "/etc/passwd", "allow_pickle": True},
           "data_dir": str(outside_folder(workspace)), "prepared_dir": None}
    (run / "job.json").write_text(json.dumps(job))
    with pytest.raises(AppError, match="pickle base model"):
        client.predict(run="forged", api_name="/train_resume")
    job["base"]["allow_pickle"] = False
    (run / "job.json").write_text(json.dumps(job))
    with pytest.raises(AppError, match="The run's base model '/etc/passwd' is outside"):
        client.predict(run="forged", api_name="/train_resume")
    job["base"] = {"kind": "demo", "location": "demo", "allow_pickle": False}
    (run / "job.json").write_text(json.dumps(job))
    with pytest.raises(AppError, match=r"The run's dataset folder .* is outside"):
        client.predict(run="forged", api_name="/train_resume")


def fetch(url, path):
    """GET a file through Gradio's file route with the login cookie of a signed-in browser."""
    import http.cookiejar

    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    opener.open(urllib.request.Request(f"{url}login", data=f"username={USER}&password={PASSWORD}".encode(),
                                       method="POST"), timeout=10)
    try:
        return opener.open(f"{url}gradio_api/file={path}", timeout=10).status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_only_what_the_page_shows_is_served(client, locked):
    url, workspace, _ = locked
    (workspace / "settings.json").write_text("{}")
    client.predict(dataset="mine", settings={**client.predict("demo", api_name="/preset"), "epochs": 1,
                                             "sample_prompts": ["lgdemo"]}, api_name="/train_start")
    run = next((workspace / "outputs").glob("lora-*"))
    state = client.predict("", 0, api_name="/job_status")
    while state["status"] in ("running", "stopping"):
        state = client.predict("", 0, api_name="/job_status")
    (run / "resume-state.pt").write_bytes(b"state")  # as an interrupted run keeps it
    image = client.predict(prompt="lgdemo", steps=2, api_name="/generate")
    assert image["image"].endswith(".png")
    for private in (workspace / "settings.json", run / "job.json", run / "resume-state.pt",
                    workspace / "datasets" / "mine" / "images" / "00_red_circle.png",
                    next((workspace / "outputs" / "test-images").glob("*.png"))):
        assert fetch(url, private) == 403, private
    shown = list((workspace / ".cache" / "gradio" / "shown").glob("*/*.png"))
    assert shown and fetch(url, shown[0]) == 200  # the test image, as the page shows it


def test_an_upload_over_the_limit_is_refused_with_the_limit(tmp_path):
    import httpx

    with running_app(tmp_path / "workspace", "--max-upload-mb", "1") as url:
        page = urllib.request.urlopen(url, timeout=10).read().decode()
        assert "uploads up to 1 MB a file" in page  # stated on the page, not discovered as an error
        answer = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.png", b"\x00" * (2 * 2**20))},
                            timeout=30)
    assert answer.status_code == 413 and "1048576 bytes" in answer.text
    assert not list((tmp_path / "workspace").rglob("big.png"))


def test_a_job_stops_only_for_the_signed_in_user_who_started_it(client, locked):
    url, _, _ = locked
    started = client.predict(dataset="mine", settings={**client.predict("demo", api_name="/preset"), "epochs": 300},
                             api_name="/train_start")
    ben = Client(url, auth=("ben", "another-Passw0rd"), verbose=False)
    with pytest.raises(AppError, match="Another signed-in user started this job"):
        ben.predict(job_id=started["job_id"], api_name="/train_stop")  # even with the id in hand
    assert client.predict(started["job_id"], 0, api_name="/job_status")["status"] == "running"
    client.predict(job_id=started["job_id"], api_name="/train_stop")
    state = client.predict(started["job_id"], 0, api_name="/job_status")
    while state["status"] not in ("stopped", "done", "error"):
        state = client.predict(started["job_id"], 0, api_name="/job_status")
    assert state["status"] == "stopped"
