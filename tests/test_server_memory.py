"""Issue 20: the memory attack, on the toy model, over loopback.

Concurrent requests each with eight solid-colour 4096x4096 PNGs (58 kB each,
inside every limit) grew the server by 10 GiB with eight requests (14.5 GiB
with sixteen): every image was decoded to full size and held until its
request ended. Now an image is scaled down right after decoding to what the
processor uses (96 px for the toy), and only the decoding threads ever hold a
full-size image, so the growth is bounded by the formula in docs/server.md
whatever the number of requests.

The server runs in this process (uvicorn in a thread), so its peak resident
memory is this process's: ``/proc/self/clear_refs`` resets the peak
(``VmHWM``) just before the attack.
"""

from __future__ import annotations

import base64
import gc
import io
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from idefics_kit import Generator
from idefics_kit.server import DEFAULT_MAX_IMAGE_PIXELS, create_app
from idefics_kit.server.chat import DECODE_THREADS
from tests.test_server import serving

pytestmark = pytest.mark.slow  # minutes on 2 cores: outside the fast loop (-m 'not slow')

REQUESTS = 6
IMAGES = 8
MIB = 1024 * 1024


def memory() -> dict[str, int]:
    """VmRSS and VmHWM (peak) of this process, in bytes."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def big_png_uri() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (4096, 4096), (200, 30, 30)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 100_000  # small on the wire, 48 MiB decoded
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_requests_of_eight_4096px_pngs_do_not_grow_the_server_by_gigabytes() -> None:
    uri = big_png_uri()
    part = {"type": "image_url", "image_url": {"url": uri}}
    body = {
        "messages": [
            {
                "role": "user",
                "content": [*[part] * IMAGES, {"type": "text", "text": "What color is the shape?"}],
            }
        ],
        "max_tokens": 3,
    }
    gen = Generator.from_pretrained("toy", device="cpu")
    try:
        # Generous image time: two shared cores decode 48 images of 16.7 Mpx each.
        app = create_app(gen, served_model_name="toy", image_timeout=120)
        with serving(app) as url:
            warm = {"messages": [{"role": "user", "content": [part]}], "max_tokens": 3}
            assert httpx.post(f"{url}/v1/chat/completions", json=warm, timeout=120).is_success
            gc.collect()
            Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from here
            before = memory()
            statuses: list[int] = []

            def client() -> None:
                response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=180)
                statuses.append(response.status_code)

            started = time.monotonic()
            threads = [threading.Thread(target=client) for _ in range(REQUESTS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(200)
            seconds = time.monotonic() - started
            after = memory()
    finally:
        gen.close()
    assert statuses == [200] * REQUESTS
    growth = after["VmHWM"] - before["VmRSS"]
    # docs/server.md: decoding threads x max_image_pixels x 8 bytes (a decoded image and
    # its oriented copy), plus the scaled-down images (here 48 x 96 x 96 px) and slack
    # for the interpreter, the request bodies and the allocator.
    bound = DECODE_THREADS * DEFAULT_MAX_IMAGE_PIXELS * 8 + 256 * MIB
    print(
        f"\n{REQUESTS} requests x {IMAGES} 4096x4096 PNGs: peak growth {growth / MIB:.0f} MiB "
        f"(bound {bound / MIB:.0f} MiB) in {seconds:.1f} s",
        file=sys.stderr,
    )
    assert growth < bound
    assert growth < 1024 * MIB
