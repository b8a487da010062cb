"""A scripted show over OSC (python-osc client): prompts, crossfades, a timed bundle.

    dreamdeck run --model ... &          # OSC on 127.0.0.1:9137, feedback to us on 9139
    python examples/osc_show.py [--host 127.0.0.1] [--port 9137] [--feedback 9139]

What it shows:
- `/dd/prompts` sets several slots at once as one JSON string (one message: one block);
- crossfading two slots by streaming `/dd/prompt/{n}/weight` at 30 Hz (the engine takes
  the latest value each block, so the rate only sets smoothness, never a backlog);
- a bundle with a future timetag: a seed and a prompt change that land together, two
  seconds from now, without the script waiting for them;
- listening for `/dd/error` and `/dd/warning` (and applied values) on the feedback port.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

from pythonosc.dispatcher import Dispatcher
from pythonosc.osc_bundle_builder import OscBundleBuilder
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_server import ThreadingOSCUDPServer
from pythonosc.udp_client import SimpleUDPClient


def listen(port: int) -> ThreadingOSCUDPServer | None:
    """Print what the engine says back. Feedback goes to the last sender's host on this port."""
    d = Dispatcher()
    d.map("/dd/error", lambda addr, *a: print("ERROR", *a))
    d.map("/dd/warning", lambda addr, *a: print("warning", *a))
    d.map("/dd/status/fps", lambda addr, fps: print(f"  {fps:.1f} fps"))
    d.map("/dd/prompt/*/text", lambda addr, *a: print("  applied", addr, *a))
    try:
        server = ThreadingOSCUDPServer(("0.0.0.0", port), d)
    except OSError as e:
        print(f"(not listening for feedback on {port}: {e})")
        return None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def crossfade(client: SimpleUDPClient, a: int, b: int, seconds: float, rate: float = 30.0) -> None:
    steps = max(1, int(seconds * rate))
    for i in range(steps + 1):
        x = i / steps
        client.send_message(f"/dd/prompt/{a}/weight", 1.0 - x)
        client.send_message(f"/dd/prompt/{b}/weight", x)
        time.sleep(1.0 / rate)


def timed_bundle(client: SimpleUDPClient, at: float, messages: list[tuple[str, list]]) -> None:
    """Messages that land together at time.time() `at` (the engine schedules; we don't wait)."""
    bundle = OscBundleBuilder(at)
    for address, args in messages:
        m = OscMessageBuilder(address)
        for a in args:
            m.add_arg(a)
        bundle.add_content(m.build())
    client.send(bundle.build())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9137)
    ap.add_argument("--feedback", type=int, default=9139)
    args = ap.parse_args()
    server = listen(args.feedback)
    client = SimpleUDPClient(args.host, args.port)

    client.send_message("/dd/get", [])  # every current value comes back on its address
    client.send_message(
        "/dd/prompts",
        json.dumps(
            [["a misty pine forest at dawn", 1.0], ["a neon city in the rain at night", 0.0]]
        ),
    )
    client.send_message("/dd/transition/blocks", 2)
    time.sleep(4)
    print("crossfade forest -> city")
    crossfade(client, 1, 2, seconds=8)
    time.sleep(2)
    print("in two seconds: new seed and a new slot-1 prompt, together")
    timed_bundle(
        client,
        time.time() + 2.0,
        [("/dd/seed", [1234]), ("/dd/prompt/1/text", ["a desert of glass under two suns"])],
    )
    time.sleep(3)
    crossfade(client, 2, 1, seconds=6)
    client.send_message("/dd/prompt/2/solo", 1)  # a trigger: weight 1 for slot 2, 0 elsewhere
    time.sleep(4)
    client.send_message("/dd/steps/preset", "fast")
    time.sleep(4)
    client.send_message(
        "/dd/steps", [1000, 750, 500, 250]
    )  # several ints, or "[1000, 750, 500, 250]"
    time.sleep(2)
    if server is not None:
        server.shutdown()


if __name__ == "__main__":
    main()
