"""The training queue: runs wait their turn in order, start by themselves, leave it for their owner, move for the
operator, and survive a restart of the server with the order and the interrupted run intact."""

import json
import os
import signal
import time

import pytest
from browser import SAME_THREADS, running_app
from gradio_client import Client
from safetensors.torch import load_file

from lora_gradio.access import Visitor
from lora_gradio.demo.shapes import make_demo_dataset
from lora_gradio.errors import UserError
from lora_gradio.request import GenerateRequest
from lora_gradio.studio import Studio
from lora_gradio.workspace import Workspace

ANNA, BORIS = Visitor("anna", False), Visitor("boris", False)
QUICK = {"epochs": 1, "batch_size": 2, "sample_prompts": [], "save_every_n_epochs": 1, "validation_images": 0,
         "scorer": "off"}


def wait_until(predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def studio_with_data(root):
    studio = Studio(Workspace.open(root))
    make_demo_dataset(studio.workspace.dataset_dir("rings", create=True) / "images", count=8)
    return studio


def queue_runs(studio, epochs, names, visitor):
    demo = studio.preset("demo")[0].to_dict()
    plan = studio.plan_training("rings", "demo", {**demo, **QUICK, "epochs": epochs, "output_name": names})
    return studio.start_training(plan, visitor)


def test_runs_wait_in_order_start_by_themselves_and_leave_or_move_as_allowed(tmp_path):
    studio = studio_with_data(tmp_path / "ws")
    first = queue_runs(studio, 300, "long", Visitor())
    wait_until(lambda: studio.jobs.view(first).step >= 1)
    second, third = queue_runs(studio, 1, "annas", ANNA), queue_runs(studio, 1, "boris", BORIS)
    fourth = queue_runs(studio, 1, "later", ANNA)
    assert [studio.jobs.view(j).position for j in (second, third, fourth)] == [1, 2, 3]
    assert studio.jobs.view(second).status == "queued" and "queued, position 1" in studio.queue_line(
        studio.jobs.view(second))
    rows = studio.queue_rows(ANNA)
    assert [row[0] for row in rows] == ["training", "1", "2", "3"]
    assert [row[2] for row in rows] == ["operator", "anna (you)", "boris", "anna (you)"]
    assert rows[1][4].startswith("in about ") and rows[3][4].startswith("in about ")  # from the estimates ahead

    third_run = rows[2][1]
    with pytest.raises(UserError, match="Another user started this job"):
        studio.cancel_queued(third_run, ANNA)
    with pytest.raises(UserError, match="Only the operator"):
        studio.move_in_queue(rows[3][1], 1, ANNA)
    studio.move_in_queue(rows[3][1], 1)  # the operator puts anna's later run first
    assert [row[1] for row in studio.queue_rows()][1:] == [rows[3][1], rows[1][1], third_run]
    assert studio.cancel_queued(third_run, BORIS) == f"Run {third_run} left the queue."
    assert studio.jobs.view(third).status == "cancelled"
    kept = json.loads(studio.queue_file.read_text())["runs"]
    assert [entry["run"] for entry in kept] == [rows[0][1], rows[3][1], rows[1][1]]
    assert kept[0]["device"] and not kept[1]["device"] and kept[1]["owner"] == "anna"

    studio.jobs.stop(first)  # the long run stops and saves; the next in line starts by itself
    assert studio.jobs.wait(first, 60).status == "stopped"
    assert studio.jobs.wait(fourth, 120).status == "done" and studio.jobs.wait(second, 120).status == "done"
    assert studio.jobs.view(fourth).started < studio.jobs.view(second).started  # in the operator's order
    assert studio.queue_rows() == [] and json.loads(studio.queue_file.read_text()) == {"runs": []}
    statuses = {row[0]: row[1] for row in studio.runs()}
    assert statuses[rows[0][1]] == "interrupted" and statuses[rows[1][1]] == "finished"


def test_a_killed_server_comes_back_with_its_queue_and_the_run_resumes_with_the_same_losses(tmp_path):
    workspace = tmp_path / "workspace"
    make_demo_dataset(workspace / "datasets" / "rings" / "images", count=8)
    settings = {**QUICK, "epochs": 10, "save_every_n_epochs": 2}

    def queue_on(client, name, epochs):
        answer = client.predict("rings", "demo", {**client.predict("demo", api_name="/preset"), **settings,
                                                  "epochs": epochs, "output_name": name}, api_name="/train_start")
        return answer["job_id"], answer["run"]

    with running_app(workspace, env=SAME_THREADS) as url:
        client = Client(url, verbose=False)
        (killed, run), (short, _), (last, _) = (queue_on(client, *what) for what in (("cut", 10), ("b", 1), ("c", 1)))
        wait_until(lambda: client.predict(killed, 0, api_name="/job_status")["step"] > 10, 120)  # past a save
        os.kill(running_app.pid, signal.SIGKILL)
        time.sleep(1)
        kept = json.loads((workspace / "queue.json").read_text())["runs"]
        assert [(e["id"], bool(e["device"])) for e in kept] == [(killed, True), (short, False), (last, False)]
    for path in workspace.rglob("*"):  # nothing under its final name is half-written
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            load_file(path)

    with running_app(workspace, env=SAME_THREADS) as url:
        client = Client(url, verbose=False)
        assert [row["place"] for row in client.predict(api_name="/queue")][:1] == ["training"]
        reference, _ = queue_on(client, "whole", 10)
        states = {job: client.predict(job, 0, api_name="/job_status") for job in (killed, short, last)}
        assert states[killed]["title"] == f"Training {run} (resumed)"
        wait_until(lambda: client.predict(reference, 0, api_name="/job_status")["status"] == "done", 300)
        done = {job: client.predict(job, 0, api_name="/job_status") for job in (killed, short, last, reference)}
        assert all(state["status"] == "done" for state in done.values())
        assert done[killed]["started"] < done[short]["started"] < done[last]["started"]  # in the kept order
        resumed, whole = ([(step, loss) for step, loss, _ in done[job]["losses"]] for job in (killed, reference))
        assert len(resumed) == 40 and resumed == whole
    assert json.loads((workspace / "queue.json").read_text()) == {"runs": []}


def test_two_devices_train_two_runs_side_by_side_and_a_third_waits_for_one(tmp_path):
    studio = Studio(Workspace.open(tmp_path / "ws"), devices=["cpu#1", "cpu#2"])
    make_demo_dataset(studio.workspace.dataset_dir("rings", create=True) / "images", count=8)
    runs = [queue_runs(studio, 300, name, Visitor()) for name in ("one", "two", "three")]
    wait_until(lambda: all(studio.jobs.view(job).step >= 2 for job in runs[:2]))
    one, two, three = (studio.jobs.view(job) for job in runs)
    assert {one.device, two.device} == {"cpu#1", "cpu#2"} and three.status == "queued" and three.position == 1
    assert all(cache.busy and cache.holds for cache in studio.caches.values())  # each device its own base
    assert [row[0] for row in studio.queue_rows()] == [f"training on {one.device}", f"training on {two.device}", "1"]
    with pytest.raises(UserError, match="busy with training"):  # no free device for a test image
        studio.generate("demo", GenerateRequest("lgdemo, a red circle", steps=2))
    studio.jobs.stop(runs[1])
    wait_until(lambda: studio.jobs.view(runs[2]).step >= 1)
    assert studio.jobs.view(runs[2]).device == two.device and studio.jobs.view(runs[0]).active
    for job in (runs[0], runs[2]):
        studio.jobs.stop(job)
        assert studio.jobs.wait(job, 60).status == "stopped"

