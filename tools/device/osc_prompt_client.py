"""Device measurement helper: send a new prompt to a running engine (`/dd/prompt/1/text`
over real OSC, python-osc) at random moments 2.2-3.4 s apart, for SECONDS seconds, and
print one line per message sent. The engine's log then says which changes joined a block
in flight and their latencies (`latencies_from_log.py`).

    python tools/device/osc_prompt_client.py 60 [PORT]
"""

import random
import sys
import time

from pythonosc.udp_client import SimpleUDPClient


def main() -> None:
    secs = float(sys.argv[1]) if len(sys.argv) > 1 else 40.0
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 9137
    client = SimpleUDPClient("127.0.0.1", port)
    t_end = time.time() + secs
    n = 0
    while time.time() < t_end:
        time.sleep(random.uniform(2.2, 3.4))
        n += 1
        client.send_message(
            "/dd/prompt/1/text", f"a scene number {n} with {random.random():.6f} light"
        )
        print(f"sent {n} at {time.time():.3f}", flush=True)


if __name__ == "__main__":
    main()
