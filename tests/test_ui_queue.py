"""The training queue in the browser, as two people on one server meet it: the second Start waits with its place,
a waiting run leaves the queue for its owner, the operator reorders, and each run starts by itself in turn."""

import re

import pytest
from browser import browser_pages, running_app, screenshot, wait_for
from test_ui_dataset_caption import type_into
from test_ui_journey import choose, set_number

from lora_gradio.demo.shapes import make_demo_dataset

LOGINS = {"ops": "operator-Passw0rd", "bea": "bea-long-Passw0rd"}


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """The app with two logins (ops runs the server) and a dataset both may train on."""
    workspace = tmp_path_factory.mktemp("team") / "workspace"
    make_demo_dataset(workspace / "datasets" / "team" / "images", count=8)
    logins = ",".join(f"{user}:{password}" for user, password in LOGINS.items())
    with running_app(workspace, env={"LORA_GRADIO_AUTH": logins}) as url:
        yield url, workspace


def sign_in(page, url, user):
    page.goto(url)
    type_into(page.get_by_label("username"), user)
    type_into(page.get_by_label("password"), LOGINS[user])
    page.get_by_role("button", name="Login").click()
    wait_for(lambda: page.locator("#dataset-picker").is_visible(), 60, f"{user}'s page")


def ready_to_train(page, epochs):
    """The Train tab on the team dataset with the demo preset, at batch 2 for ``epochs`` epochs."""
    choose(page, "#dataset-picker", "team")
    page.get_by_role("tab", name="Train").click()
    choose(page, "#preset", "demo")
    wait_for(lambda: page.locator("#field-rank input").input_value() == "8", what="the demo preset")
    set_number(page, "#field-batch_size", 2)
    set_number(page, "#field-epochs", epochs)


def queue_table(page):
    """The queue as the page shows it: (place, run, added by) of each row."""
    rows = page.locator("#train-queue-table [role=row]").all_inner_texts()[1:]  # after the header, a row a run
    cells = [[cell.strip() for cell in row.replace("\t", "").split("\n")] for row in rows]
    return [tuple(row[:3]) for row in cells if len(row) >= 3]  # a row being redrawn has no cells yet


def rows_if(rows, wanted):
    """The rows read, when they are what is awaited (one reading: the table may be redrawn between two)."""
    return rows if wanted(rows) else None


def progress(page):
    return page.locator("#training-progress-text").inner_text()


def test_a_second_start_waits_its_turn_leaves_moves_and_starts_by_itself(team):
    url, workspace = team
    with browser_pages(2) as (ops, bea):
        sign_in(ops, url, "ops")
        sign_in(bea, url, "bea")
        ready_to_train(ops, 500)
        ready_to_train(bea, 1)
        assert not ops.locator("#train-queue").is_visible()  # nothing trains or waits yet

        ops.locator("#train-start").click()
        wait_for(lambda: re.search(r"running: step [1-9]", progress(ops)), 90, "the operator's run")
        wait_for(lambda: bea.locator("#train-start").inner_text() == "Add to the queue", 30, "Start, as a queue")
        bea.locator("#train-start").click()
        wait_for(lambda: "is queued, position 1" in bea.locator("#train-queue-line").inner_text(), 30,
                 "bea's place in the queue")
        assert "it should start in about" in bea.locator("#train-queue-line").inner_text()
        first = wait_for(lambda: rows_if(queue_table(bea), lambda rows: [(place, who) for place, _, who in rows] == [
            ("training", "ops"), ("1", "bea (you)")]), 30, "the queue, with bea's run second")
        bea_run = first[1][1]

        bea.locator("#train-start").click()  # a second run of bea's, which she takes back
        second = wait_for(lambda: rows_if(queue_table(bea), lambda rows: len(rows) == 3), 30,
                          "bea's second run in the queue")[2][1]
        wait_for(lambda: bea.locator("#train-queue-run").get_by_role("combobox").input_value() == second, 30,
                 "the newest waiting run, chosen")
        assert not bea.locator("#train-queue-move").is_visible()  # reordering is the operator's
        bea.locator("#train-queue-leave").click()
        wait_for(lambda: f"Run {second} left the queue." in bea.locator("#train-queue-note").inner_text(), 30,
                 "the answer to Leave")
        wait_for(lambda: [run for _, run, _ in queue_table(ops)] == [first[0][1], bea_run], 30,
                 "the queue without it, on the operator's page too")

        set_number(ops, "#field-epochs", 1)
        ops.locator("#train-start").click()  # the operator queues a short run behind bea's and moves it first
        ops_run = wait_for(lambda: rows_if(queue_table(ops), lambda rows: len(rows) == 3), 30,
                           "the operator's second run")[2][1]
        wait_for(lambda: ops.locator("#train-queue-move").is_visible(), 30, "Move, for the operator")
        choose(ops, "#train-queue-run", ops_run)
        set_number(ops, "#train-queue-place", 1)
        ops.locator("#train-queue-move").click()
        wait_for(lambda: [run for _, run, _ in queue_table(bea)][1:] == [ops_run, bea_run], 30,
                 "the new order, on bea's page")
        wait_for(lambda: f"Run {bea_run} is queued, position 2" in bea.locator("#train-queue-line").inner_text(),
                 30, "bea's new place")
        screenshot(bea, "queue-moved")

        ops.locator("#train-stop").click()  # the long run ends; the queue goes on by itself
        wait_for(lambda: (workspace / "outputs" / ops_run / "team.safetensors").exists(), 120,
                 "the operator's short run, first")
        wait_for(lambda: (workspace / "outputs" / bea_run / "team.safetensors").exists(), 120,
                 "bea's run, by itself after it")
        wait_for(lambda: progress(bea).startswith("done") and bea_run in progress(bea), 30, "bea's run, done")
        wait_for(lambda: bea.locator("#train-queue-line").inner_text() == "", 30, "no queue line left")  # a redraw
        wait_for(lambda: not bea.locator("#train-queue").is_visible(), 30, "the empty queue, hidden")
