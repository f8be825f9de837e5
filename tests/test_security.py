"""The app as a stranger with the link meets it: sign-in, the server's files kept private, limits, no stray Stop."""

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from browser import ROOT, raw_call, running_app
from gradio_client import Client
from gradio_client.exceptions import AppError

from lora_gradio.demo.shapes import make_demo_dataset

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
    make_demo_dataset(workspace / "datasets" / "mine" / "images", count=8)
    return app


def outside_folder(workspace):
    folder = workspace.parent / "private-photos"
    if not folder.exists():
        make_demo_dataset(folder, count=8)
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
    (workspace / "outputs" / "test-images").mkdir(exist_ok=True)
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
    run = next((workspace / "outputs").glob("mine-*"))
    state = client.predict("", 0, api_name="/job_status")
    while state["status"] in ("running", "stopping"):
        state = client.predict("", 0, api_name="/job_status")
    (run / "resume-state.pt").write_bytes(b"state")  # as an interrupted run keeps it
    image = client.predict(prompt="lgdemo", steps=2, api_name="/generate")
    assert image["image"].endswith(".png")
    for private in (workspace / "settings.json", run / "job.json", run / "resume-state.pt",
                    workspace / "datasets" / "mine" / "images" / "00_red_ring.png",
                    next((workspace / "outputs" / "test-images").rglob("*.png"))):
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
    with pytest.raises(AppError, match="Another user started this job"):
        ben.predict(job_id=started["job_id"], api_name="/train_stop")  # even with the id in hand
    assert client.predict(started["job_id"], 0, api_name="/job_status")["status"] == "running"
    client.predict(job_id=started["job_id"], api_name="/train_stop")
    state = client.predict(started["job_id"], 0, api_name="/job_status")
    while state["status"] not in ("stopped", "done", "error"):
        state = client.predict(started["job_id"], 0, api_name="/job_status")
    assert state["status"] == "stopped"


# A guest (ben) and the operator (anna, the first login) of one shared server: each finding of a guest's reach.

GUEST = ("ben", "another-Passw0rd")


@pytest.fixture(scope="module")
def guest(locked, client):
    return Client(locked[0], auth=GUEST, verbose=False)


def signed_in(url, user, password):
    """An HTTP client holding a browser's login cookie, as any script can have one."""
    import httpx

    session = httpx.Client(base_url=url, timeout=60)
    assert session.post("login", data={"username": user, "password": password}).status_code == 200
    return session


def wait_done(app, job_id):
    state = app.predict(job_id, 0, api_name="/job_status")
    while state["status"] in ("running", "stopping"):
        state = app.predict(job_id, 0, api_name="/job_status")
    return state


def test_a_preset_is_a_name_never_a_server_file(guest, locked):
    _, workspace, _ = locked
    secret = workspace.parent / "app_secrets.toml"
    secret.write_text('rank = "rank-secret-value"\npassword = "hunter2-secret"\n')
    answers = []
    for name in (str(secret), str(workspace.parent / "absent.toml"), "../app_secrets", "/etc/hostname"):
        with pytest.raises(AppError) as refused:
            guest.predict(name, api_name="/preset")
        answers.append(str(refused.value))
    assert len(set(answers)) == 1 and "No preset has that name" in answers[0]  # exists or not: the same words
    assert "secret" not in answers[0] and "hunter2" not in answers[0]
    assert guest.predict("demo", api_name="/preset")["epochs"] >= 1  # a name works


def test_with_logins_the_home_folder_is_not_allowed(guest, client, locked):
    _, workspace, _ = locked
    guest.predict("ben-set", api_name="/create_dataset")
    for app in (guest, client):  # the operator too: with logins, only the workspace and --allow-dir folders
        with pytest.raises(AppError, match="outside the folders this app may use"):
            app.predict("ben-set" if app is guest else "mine", "~", api_name="/import_folder")
    assert not list((workspace / "datasets" / "ben-set" / "images").glob("*"))


def test_a_captioning_model_folder_outside_is_refused_like_any_path(guest, locked):
    _, workspace, _ = locked
    answers = []
    for folder in (str(outside_folder(workspace)), "/nonexistent/blip-folder", "/etc"):
        with pytest.raises(AppError, match=r"The captioning model's folder .* is outside the folders this app may") \
                as refused:
            guest.predict("ben-set", folder, api_name="/caption")
        answers.append(str(refused.value).replace(folder, "FOLDER"))
    assert len(set(answers)) == 1  # nothing said about whether the folder exists


def test_a_clip_scorer_folder_outside_is_refused_before_training_and_on_resume(guest, client, locked):
    import json

    _, workspace, _ = locked
    settings = {**guest.predict("demo", api_name="/preset"), "scorer": str(outside_folder(workspace))}
    with pytest.raises(AppError, match=r"The CLIP scorer folder .* is outside the folders this app may use"):
        guest.predict(dataset="mine", settings=settings, api_name="/train_start")
    run = workspace / "outputs" / "forged-scorer"  # a job file that names one is refused the same way
    run.mkdir(parents=True)
    (run / "resume-state.pt").write_bytes(b"")
    job = {"config": {"scorer": "/etc"}, "base": {"kind": "demo", "location": "demo", "allow_pickle": False},
           "data_dir": str(workspace / "datasets" / "mine" / "images"), "prepared_dir": None}
    (run / "job.json").write_text(json.dumps(job))
    with pytest.raises(AppError, match=r"The CLIP scorer folder .* is outside"):
        client.predict(run="forged-scorer", api_name="/train_resume")
    shutil.rmtree(run)  # the forged run leaves the module's list of runs as it found it


def test_odd_paths_get_the_ordinary_message(guest):
    for path in ("photos\0/../etc", "/tmp/" + "x" * 5000):
        with pytest.raises(AppError, match="outside the folders this app may use"):
            guest.predict("ben-set", path, api_name="/import_folder")
        with pytest.raises(AppError, match="outside the folders this app may use"):
            guest.predict(prompt="x", steps=2, base=path, api_name="/generate")
        with pytest.raises(AppError, match="is not a run name"):
            guest.predict(path, api_name="/delete_run")


def test_a_guest_cannot_change_the_workspace_or_another_users_dataset(guest, client, locked):
    _, workspace, _ = locked
    with pytest.raises(AppError, match="Only the operator who runs this server can change the workspace settings"):
        guest.predict(str(workspace / "models"), api_name="/set_models_dir")
    for call in (lambda: guest.predict("mine", str(workspace / "datasets" / "ben-set"), api_name="/import_folder"),
                 lambda: guest.predict("mine", api_name="/delete_dataset"),
                 lambda: guest.predict("mine", 512, api_name="/prepare")):
        with pytest.raises(AppError, match="Dataset 'mine' belongs to another user"):
            call()
    assert len(list((workspace / "datasets" / "mine" / "images").glob("*.png"))) == 8
    guest.predict("ben-temp", api_name="/create_dataset")
    assert guest.predict("ben-temp", api_name="/delete_dataset") == "Deleted dataset ben-temp."
    assert not (workspace / "datasets" / "ben-temp").exists()


def test_runs_belong_to_who_started_them_and_delete_means_deleted(guest, client, locked):
    url, workspace, _ = locked
    settings = {**client.predict("demo", api_name="/preset"), "epochs": 1, "output_name": "owners"}
    started = client.predict(dataset="mine", settings=settings, api_name="/train_start")
    state = wait_done(client, started["job_id"])
    assert state["status"] == "done"
    assert json.loads((workspace / "outputs" / started["run"] / "job.json").read_text())["started_by"] == USER
    lora = f"{started['run']}/owners.safetensors"
    download = client.predict(lora, api_name="/download_lora")
    served = Path(download).name
    link = next((workspace / ".cache" / "gradio" / "shown").glob(f"*/{served}"))
    session = signed_in(url, USER, PASSWORD)
    assert session.get(f"gradio_api/file={link}").status_code == 200
    with pytest.raises(AppError, match=f"Run '{started['run']}' belongs to another user"):
        guest.predict(started["run"], api_name="/delete_run")
    with pytest.raises(AppError, match="belongs to another user"):
        guest.predict(started["run"], api_name="/train_resume")
    assert (workspace / "outputs" / started["run"] / "owners.safetensors").is_file()
    assert client.predict(started["run"], api_name="/delete_run") == f"Deleted run {started['run']}."
    assert not (workspace / "outputs" / started["run"]).exists()
    assert session.get(f"gradio_api/file={link}").status_code == 404 and not link.exists()


def test_a_guest_run_over_the_caps_is_refused_before_it_starts(guest, locked):
    _, workspace, _ = locked
    make_demo_dataset(workspace / "datasets" / "ben-set" / "images", count=8)
    settings = {**guest.predict("demo", api_name="/preset"), "batch_size": 2}  # 4 steps an epoch of 8 images
    with pytest.raises(AppError, match=r"estimated at about .*up to 120 min a run .*--max-train-minutes"):
        guest.predict(dataset="ben-set", settings={**settings, "max_train_steps": 1_000_000}, api_name="/train_start")
    with pytest.raises(AppError, match=r"would render \d+ sample images, .* allows visitors 200 a run .*--max-samples"):
        guest.predict(dataset="ben-set", settings={**settings, "epochs": 200, "sample_every_n_steps": 1,
                                                   "sample_prompts": ["lgdemo"]}, api_name="/train_start")
    assert not [p for p in (workspace / "outputs").iterdir() if p.name.startswith("ben-set-")
                and json.loads((p / "job.json").read_text()).get("started_by") == "ben"]


def test_the_operator_stops_a_guest_run_within_seconds_while_samples_render(guest, client, locked):
    import time

    _, workspace, _ = locked
    settings = {**guest.predict("demo", api_name="/preset"), "epochs": 2, "sample_steps": 100, "sample_width": 256,
                "sample_height": 256, "sample_prompts": ["lgdemo, one", "lgdemo, two"], "output_name": "heavy"}
    started = guest.predict(dataset="ben-set", settings=settings, api_name="/train_start")
    state = guest.predict(started["job_id"], 0, api_name="/job_status")
    while "Rendering sample images" not in state["message"]:
        assert state["status"] == "running", state["message"]
        state = guest.predict(started["job_id"], 0, api_name="/job_status")
    time.sleep(1.0)  # well inside the round: two prompts of 100 steps take many seconds here
    asked = time.monotonic()
    client.predict(job_id=started["job_id"], api_name="/train_stop")  # the operator, who did not start it
    state = wait_done(guest, started["job_id"])
    assert state["status"] == "stopped" and time.monotonic() - asked < 10
    assert not list((workspace / "outputs" / started["run"] / "samples").glob("*.png"))  # no half-made image


def test_job_status_shows_no_server_path(guest):
    state = guest.predict("", 0, api_name="/job_status")
    text = json.dumps(state)
    assert state["run_dir"] and state["log"]
    assert "/tmp/" not in text and not any(isinstance(v, str) and v.startswith("/") for v in state.values())
    assert state["run_dir"].startswith("outputs/")


def test_a_huge_grid_is_refused_before_any_lookup(guest):
    with pytest.raises(AppError, match=r"grids up to 36 images \(3000 asked\)"):
        guest.predict(loras=[f"no-such-run/lora-{i}.safetensors" for i in range(3000)], strengths=[1.0],
                      prompt="x", steps=2, api_name="/grid")


def test_page_events_called_by_a_guest_touch_nothing_of_the_owner(guest, client, locked):
    url, workspace, _ = locked
    client.predict(prompt="lgdemo", steps=2, api_name="/generate")
    guest.predict(prompt="lgdemo", steps=2, api_name="/generate")
    owners = sorted((workspace / "outputs" / "test-images").rglob("*.png"))
    session = signed_in(url, *GUEST)
    by_name = session.post("gradio_api/call/on_clear", json={"data": []})
    assert by_name.status_code == 404  # page wiring is not an API endpoint
    config = session.get("config").json()
    index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "on_clear")
    joined = session.post("gradio_api/queue/join", json={"data": [], "fn_index": index, "session_hash": "guest-1",
                                                          "event_data": None, "trigger_id": None})
    assert joined.status_code == 200
    stream = session.get("gradio_api/queue/data", params={"session_hash": "guest-1"}).text
    assert "process_completed" in stream and "Deleted 1 test images" in stream
    left = sorted((workspace / "outputs" / "test-images").rglob("*.png"))
    assert len(left) == len(owners) - 1 and set(left) < set(owners)  # the guest's own image went, nothing else


def test_the_sixth_failed_login_is_slower_than_the_first(locked):
    import time

    import httpx

    url = locked[0]
    times = []
    for _ in range(6):
        started = time.monotonic()
        assert httpx.post(f"{url}login", data={"username": "ben", "password": "wrong-guess"}).status_code == 400
        times.append(time.monotonic() - started)
    assert times[5] > times[0] + 0.9
    signed_in(url, *GUEST)  # the right password still works, and clears the count
    started = time.monotonic()
    httpx.post(f"{url}login", data={"username": "ben", "password": "wrong-guess"})
    assert time.monotonic() - started < 0.9


def test_a_short_password_is_refused_at_start(tmp_path):
    done = start_refused("--auth", "bob:tiny7", "--workspace", str(tmp_path / "ws"))
    assert done.returncode == 2 and "--auth #1 (user bob) is shorter than 8 characters" in done.stderr
    assert "tiny7" not in done.stderr and not (tmp_path / "ws").exists()


def test_a_guest_in_the_browser_sees_the_limits_and_cannot_delete_the_operators_run(locked, client):
    from browser import browser_page, screenshot, wait_for
    from test_ui_journey import choose

    url, workspace, _ = locked
    theirs = next(p.name for p in (workspace / "outputs").iterdir()
                  if (p / "job.json").is_file() and json.loads((p / "job.json").read_text()).get("started_by") == USER)
    with browser_page() as page:
        page.goto(url)
        page.get_by_label("username").press_sequentially("ben", delay=30)
        page.get_by_label("password").press_sequentially(GUEST[1], delay=30)
        page.get_by_label("password").press("Enter")
        page.get_by_role("tab", name="Train").click()
        limits = page.locator("#train-estimate")
        wait_for(lambda: "Runs started by anyone but the operator: up to 120 min (estimated) and 200 sample images"
                 in limits.inner_text(), 60, "the training limits")
        wait_for(lambda: page.locator("#runs-table").is_visible() or page.locator("#runs-panel").is_visible(), 30,
                 "the runs panel")
        if not page.locator("#runs-delete-choice").is_visible():  # it opens by itself while a run waits to resume
            page.get_by_text("Runs: resume, delete").click()
        choose(page, "#runs-delete-choice", theirs)
        page.locator("#runs-delete").click()
        page.locator("#runs-delete-yes").click()
        toast = page.locator(".toast-body")
        wait_for(lambda: toast.count() and f"Run '{theirs}' belongs to another user" in toast.first.inner_text(), 30,
                 "the refusal")
        screenshot(page, "guest-refused")
        page.get_by_text("Workspace settings").click()
        assert "Only the operator changes these settings" in page.locator("#workspace-access").inner_text()
        assert page.locator("#models-dir textarea, #models-dir input").first.input_value() == ""
    assert (workspace / "outputs" / theirs / "job.json").is_file()


def test_a_guest_loads_the_demo_dataset_as_theirs_and_not_without_the_password(guest, client, locked):
    url, workspace, _ = locked
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do, a dataset will not
        Client(url, verbose=False).predict(api_name="/load_demo_dataset")
    names = [guest.predict(api_name="/load_demo_dataset"), client.predict(api_name="/load_demo_dataset")]
    assert names == ["demo-rings", "demo-rings-2"]
    owners = {name: json.loads((workspace / "datasets" / name / "dataset.json").read_text()).get("owner")
              for name in names}
    assert owners[names[0]] == "ben"
    with pytest.raises(AppError, match="Dataset 'demo-rings-2' belongs to another user"):
        guest.predict(names[1], api_name="/delete_dataset")  # the operator's, untouchable for him


def test_only_uploaded_files_are_read_as_uploads(tmp_path, monkeypatch):
    """What a handler takes as an uploaded file must be one: a server path, or a workspace file the page shows,
    is refused by name before anything reads it."""
    from lora_gradio.errors import UserError
    from lora_gradio.ui.common import uploaded

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    sent = tmp_path / "uploads" / "3f2a" / "config.json"
    sent.parent.mkdir(parents=True)
    sent.write_text("{}")
    assert uploaded([{"path": str(sent)}]) == [sent.resolve()] == uploaded(str(sent))
    for elsewhere in (tmp_path / "settings.json", tmp_path / "uploads" / "shown" / "a1" / "sample.png",
                      tmp_path / "uploads" / "3f2a" / ".." / ".." / "settings.json"):
        with pytest.raises(UserError, match=f"'{elsewhere.name}' was not uploaded to this app"):
            uploaded([{"path": str(elsewhere)}])


def test_the_lora_tools_take_hostile_values_and_racing_guests(guest, client, locked, demo_pipe):
    from concurrent.futures import ThreadPoolExecutor

    from test_network_types import trained_file

    from lora_gradio.ldm_layout import pipeline_to_ldm

    _, workspace, _ = locked
    loras = workspace / "models" / "loras"
    trained_file(demo_pipe, "lora", loras / "shared.safetensors")
    with pytest.raises(AppError, match="Only the operator who runs this server can bake"):
        guest.predict("loras/shared.safetensors", api_name="/lora_bake")
    outside = workspace.parent / "tuned.safetensors"
    if not outside.exists():
        from safetensors.torch import save_file

        save_file(pipeline_to_ldm(demo_pipe), outside)
    with pytest.raises(AppError, match="outside the folders this app may use"):
        guest.predict(str(outside), api_name="/lora_extract")
    with pytest.raises(AppError, match="is not in this workspace"):
        guest.predict("../../../etc/passwd", 2, api_name="/lora_resize")
    session = signed_in(locked[0], *GUEST)
    for rank in ("NaN", "0", "5000", "2.5", "1e300"):
        assert "whole number from 1 to 1024" in raw_call(locked[0], "lora_resize",
                                                         f'"loras/shared.safetensors", {rank}, "fixed", 0, ""', session)
    assert "The sv_fro value must be" in raw_call(locked[0], "lora_resize",
                                                  '"loras/shared.safetensors", 4, "sv_fro", NaN, ""', session)
    assert "merge weight must be a number" in raw_call(locked[0], "lora_merge",
                                                       '["loras/shared.safetensors", "loras/shared.safetensors"], '
                                                       "[1, Infinity], 0, \"fixed\", 0, \"\"", session)
    ben = Client(locked[0], auth=("ben", "another-Passw0rd"), verbose=False)
    with ThreadPoolExecutor(3) as pool:  # three people, one new name, at the same moment
        calls = [pool.submit(who.predict, "loras/shared.safetensors", 2, "fixed", 0.0, "../../race",
                             api_name="/lora_resize") for who in (guest, client, ben)]
        outcomes = [call.exception() or call.result() for call in calls]
    made = [o for o in outcomes if isinstance(o, dict)]
    assert len(made) == 1 and made[0]["file"] == "models/loras/_.._race.safetensors", outcomes  # kept inside
    assert all("race.safetensors" in str(o) and ("already exists" in str(o) or "meanwhile" in str(o))
               for o in outcomes if not isinstance(o, dict))
    assert sorted(p.name for p in loras.iterdir()) == ["_.._race.safetensors", "shared.safetensors"]  # no stray
    assert not list(workspace.parent.glob("*race*"))
