"""The Train tab's training queue: what trains now and what waits, who added each run and when it should start; a
visitor takes their own runs out of it, and the operator also moves any run up or down."""

from __future__ import annotations

import math
from dataclasses import dataclass

import gradio as gr

from ..access import Visitor
from ..errors import UserError
from ..studio import QUEUE_COLUMNS, YOU
from .common import PRIVATE, AppContext, user_errors


@dataclass
class QueuePanel:
    """This page's own place in the queue, then the queue for everyone, with Leave and (the operator's) Move."""

    line: gr.Markdown
    group: gr.Group
    table: gr.Dataframe
    waiting: gr.Dropdown
    leave: gr.Button
    place: gr.Number
    move: gr.Button
    note: gr.Markdown

    @property
    def shown(self) -> list:
        """What a tick may change."""
        return [self.line, self.group, self.table, self.waiting, self.place, self.move]

    def updates(self, ctx: AppContext, seen: dict, before: dict, job_ids: list[str], visitor: Visitor) -> dict:
        """The queue as it is now, and where the visitor's waiting runs stand (the page's ``job_ids`` among them),
        sent only where it changed since ``before``; ``seen`` keeps what was sent."""
        rows = ctx.studio.queue_rows(visitor)
        seen["queue"] = rows
        seen["queue_line"] = "\n\n".join(map(ctx.studio.queue_line, ctx.studio.waiting_for(visitor, job_ids)))
        seen["waiting"] = [row[1] for row in rows  # the visitor's own waiting runs; every one for the operator
                           if row[0].isdigit() and (visitor.operator or row[2].endswith(YOU))]
        shows = {self.table: rows, self.group: gr.update(visible=bool(rows))} if rows != before.get("queue") else {}
        if seen["waiting"] != before.get("waiting"):
            waiting, mover = seen["waiting"], visitor.operator and len(seen["waiting"]) > 1
            shows |= {self.waiting: gr.update(choices=waiting, value=waiting[-1] if waiting else None),
                      self.place: gr.update(visible=mover), self.move: gr.update(visible=mover)}
        if seen["queue_line"] != before.get("queue_line"):
            shows[self.line] = seen["queue_line"]
        return shows


def queue_panel() -> QueuePanel:
    """The page's line, then the queue in a group that shows only while something trains or waits."""
    line = gr.Markdown(elem_id="train-queue-line")
    with gr.Group(visible=False, elem_id="train-queue") as group:
        table = gr.Dataframe(headers=QUEUE_COLUMNS, interactive=False, elem_id="train-queue-table",
                             label="Training queue: what trains now, then what waits, first in line first")
        with gr.Row(equal_height=True):
            waiting = gr.Dropdown([], label="Waiting run", scale=3, elem_id="train-queue-run")
            leave = gr.Button("Leave the queue", scale=1, elem_id="train-queue-leave")
            place = gr.Number(1, label="Move to place", precision=0, minimum=1, maximum=10_000, scale=1,
                              visible=False, elem_id="train-queue-place")
            move = gr.Button("Move", scale=1, visible=False, elem_id="train-queue-move")
        note = gr.Markdown(elem_id="train-queue-note")
    return QueuePanel(line, group, table, waiting, leave, place, move, note)


def wire_queue(ctx: AppContext, panel: QueuePanel) -> None:
    """Leave takes the chosen waiting run out of the queue (the visitor's own; any for the operator); Move puts it
    at the place given (the operator alone)."""

    @user_errors
    def on_leave(run: str | None, request: gr.Request) -> str:
        return ctx.studio.cancel_queued(run, ctx.visitor(request))

    @user_errors
    def on_move(run: str | None, place: float | None, request: gr.Request) -> str:
        if place is None or not math.isfinite(place) or place != int(place):
            raise UserError("Give the new place as a whole number from 1 (next to start).")
        return ctx.studio.move_in_queue(run, int(place), ctx.visitor(request))

    panel.leave.click(on_leave, panel.waiting, panel.note, **PRIVATE)
    panel.move.click(on_move, [panel.waiting, panel.place], panel.note, **PRIVATE)
