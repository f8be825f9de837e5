"""A shared server under load: the app with two logins, a demo run training and two more queued, while bounded
visitors on loopback open the page, poll /job_status, generate on the Test tab and upload small datasets. Prints
JSON: the p50 and p95 of the page's config and of /job_status, the generations served and refused, requests without
an answer, tracebacks in the server log, and the server's RSS over time: at rest before (the model loaded, one run
done), during the load, and at rest again once the runs have ended.

    python bench/load.py                     # 20 page visitors, 60 s of load
    python bench/load.py --visitors 5 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
import psutil
from gradio_client import Client, handle_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from browser import running_app  # noqa: E402  (the tests' launcher: the real app.py on a free port)

from lora_gradio.demo.shapes import make_demo_dataset  # noqa: E402

LOGINS = {"ana": "ana-long-Passw0rd", "ben": "ben-long-Passw0rd"}
RELOAD_S = 5.0  # each page visitor opens the page again this often, far more than a person does


def quantiles(values: list[float]) -> dict:
    """p50 and p95 in seconds, and how many."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    return {"count": len(values), "p50": round(statistics.median(ordered), 3),
            "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3)}


class Load:
    """The visitors' threads and what they measured."""

    def __init__(self, url: str, seconds: float) -> None:
        self.url, self.until = url, time.monotonic() + seconds
        self.lock = threading.Lock()
        self.config_s: list[float] = []
        self.status_s: list[float] = []
        self.served = self.refused = self.uploads = 0
        self.unanswered: list[str] = []

    def running(self) -> bool:
        return time.monotonic() < self.until

    def note(self, what: str, exc: BaseException) -> None:
        with self.lock:
            self.unanswered.append(f"{what}: {type(exc).__name__}: {str(exc)[:200]}")

    def page_visitor(self, user: str, index: int) -> None:
        """Sign in, then open the page (its config) every few seconds, as reloads and new tabs do."""
        time.sleep(index * RELOAD_S / 20)  # visitors arrive spread out, not all in the same second
        with httpx.Client(base_url=self.url, timeout=60) as http:
            http.post("/login", data={"username": user, "password": LOGINS[user]})
            while self.running():
                start = time.perf_counter()
                try:
                    http.get("/config").raise_for_status()
                    with self.lock:
                        self.config_s.append(time.perf_counter() - start)
                except httpx.HTTPError as exc:
                    self.note("config", exc)
                time.sleep(RELOAD_S)

    def poller(self, client: Client) -> None:
        """/job_status once a second, as an open Train tab does."""
        while self.running():
            start = time.perf_counter()
            try:
                client.predict("", 0, api_name="/job_status")
                with self.lock:
                    self.status_s.append(time.perf_counter() - start)
            except Exception as exc:  # any failure is a request that got no proper answer
                self.note("job_status", exc)
            time.sleep(1.0)

    def generator(self, client: Client, seed: int) -> None:
        """Test-tab images; while every device trains, the answer is a refusal that says the model is busy."""
        while self.running():
            try:
                client.predict(prompt="lgring, a blue lgring on a yellow background", seed=seed, steps=10,
                               api_name="/generate")
                with self.lock:
                    self.served += 1
            except Exception as exc:
                if "busy" in str(exc):
                    with self.lock:
                        self.refused += 1
                else:
                    self.note("generate", exc)
            time.sleep(1.0)

    def uploader(self, client: Client, name: str, folder: Path) -> None:
        """A small dataset uploaded as a zip, into a new dataset each time."""
        archive = folder / f"{name}.zip"
        with zipfile.ZipFile(archive, "w") as packed:
            for path in sorted(make_demo_dataset(folder / name, count=4).iterdir()):
                packed.write(path, path.name)
        round_ = 0
        while self.running():
            round_ += 1
            try:
                dataset = client.predict(f"{name}-{round_}", api_name="/create_dataset")
                client.predict(dataset, [handle_file(str(archive))], api_name="/import_files")
                with self.lock:
                    self.uploads += 1
            except Exception as exc:
                self.note("upload", exc)
            time.sleep(2.0)


def rss_mb(pid: int) -> float:
    """The server's resident memory, children included (none today)."""
    process = psutil.Process(pid)
    return round(sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20, 1)


def main() -> None:
    """Start the app, queue three runs, load it, and report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visitors", type=int, default=20, help="page visitors opening the page")
    parser.add_argument("--seconds", type=float, default=60, help="how long the load lasts")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lora-load-"))
    workspace = root / "workspace"
    logins = ",".join(f"{user}:{password}" for user, password in LOGINS.items())
    with running_app(workspace, env={"LORA_GRADIO_AUTH": logins}) as url:
        pid = running_app.pid
        ana, ben = (Client(url, auth=(user, LOGINS[user]), verbose=False) for user in LOGINS)
        dataset = ana.predict(api_name="/load_demo_dataset")
        settings = ana.predict("demo", api_name="/preset")
        warm_up = ana.predict(dataset, "demo", {**settings, "epochs": 5}, api_name="/train_start")
        while ana.predict(warm_up["job_id"], 0, api_name="/job_status")["status"] == "running":
            time.sleep(1.0)
        time.sleep(5)
        baseline = rss_mb(pid)  # the model loaded and one run done: the server's memory at rest
        queued = [client.predict(dataset, "demo", {**settings, "epochs": epochs}, api_name="/train_start")
                  for client, epochs in ((ana, 1000), (ben, 20), (ana, 20))]
        time.sleep(5)
        memory = [(0.0, rss_mb(pid))]
        load = Load(url, args.seconds)
        clients = [Client(url, auth=(user, LOGINS[user]), verbose=False) for user in ("ana", "ben") * 3]
        threads = [threading.Thread(target=load.page_visitor, args=(list(LOGINS)[i % 2], i))
                   for i in range(args.visitors)]
        threads += [threading.Thread(target=load.poller, args=(client,)) for client in clients[:4]]
        threads += [threading.Thread(target=load.generator, args=(client, i)) for i, client in enumerate(clients[4:])]
        threads += [threading.Thread(target=load.uploader, args=(ana, "upload-a", root)),
                    threading.Thread(target=load.uploader, args=(ben, "upload-b", root))]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            memory.append((round(time.monotonic() - started, 1), rss_mb(pid)))
            time.sleep(2.0)
        steps = ana.predict(queued[0]["job_id"], 0, api_name="/job_status")["step"]
        ana.predict(queued[0]["job_id"], api_name="/train_stop")  # the queued runs follow, then all is quiet
        for answer, client in zip(queued[1:], (ben, ana), strict=True):
            while client.predict(answer["job_id"], 0, api_name="/job_status")["status"] in ("queued", "running"):
                time.sleep(1.0)
        time.sleep(10)
        memory.append((round(time.monotonic() - started, 1), rss_mb(pid)))
        after = memory[-1][1]
    log_text = "".join(path.read_text() for path in root.glob("app-*.log"))
    print(json.dumps({
        "visitors": args.visitors, "seconds": args.seconds, "training_steps_during_load": steps,
        "config": quantiles(load.config_s), "job_status": quantiles(load.status_s),
        "generations": {"served": load.served, "refused_busy": load.refused}, "uploads": load.uploads,
        "unanswered": load.unanswered, "tracebacks": log_text.count("Traceback"),
        "rss_mb": {"baseline": baseline, "peak": max(mb for _, mb in memory), "after": after, "over_time": memory},
    }, indent=1))


if __name__ == "__main__":
    main()
