"""Drive the app in the container as a script would: refused without the password, a demo LoRA with it; or, with
--start-long-run, start a long run and print its name once it has made a few steps."""

import sys
import time

from gradio_client import Client
from safetensors import safe_open

url, user, password = sys.argv[1:4]
client = Client(url, auth=(user, password), verbose=False)
if sys.argv[4:] == ["--start-long-run"]:  # a run the container is stopped in the middle of; prints its name
    long_run = {**client.predict("demo", api_name="/preset"), "epochs": 500}
    started = client.predict(dataset="ci", base="demo", settings=long_run, api_name="/train_start")
    deadline = time.monotonic() + 120
    while client.predict(started["job_id"], 0, api_name="/job_status")["step"] < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    print(started["run"])
    sys.exit(0)

try:
    Client(url, verbose=False).predict(api_name="/cache_status")
except Exception as exc:  # any refusal will do; a success will not
    print(f"without the password: refused ({type(exc).__name__})")
else:
    sys.exit("the API answered without the password")

short = {**client.predict("demo", api_name="/preset"), "epochs": 4}
started = client.predict(dataset="ci", base="demo", settings=short, api_name="/train_start")
deadline = time.monotonic() + 600
state = client.predict(started["job_id"], 0, api_name="/job_status")
while state["status"] in ("running", "stopping") and time.monotonic() < deadline:
    time.sleep(1)
    state = client.predict(started["job_id"], 0, api_name="/job_status")
if state["status"] != "done":
    sys.exit(f"training in the container ended as {state['status']}: {state['message']}")
lora = client.predict(f"{started['run']}/ci.safetensors", api_name="/download_lora")  # named after its dataset
with safe_open(lora, "pt") as handle:
    metadata = handle.metadata()
    assert metadata["ss_base_model_version"] == "sd_v1" and any(k.startswith("lora_unet_") for k in handle.keys())  # noqa: SIM118
print(f"trained {state['step']} steps in the container; LoRA back with {len(metadata)} metadata keys")
