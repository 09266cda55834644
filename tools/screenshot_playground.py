"""Take docs/playground.png: the playground page answering the toy model, in a real browser.

    python tools/screenshot_playground.py                 # writes docs/playground.png
    python tools/screenshot_playground.py --out /tmp/p.png --chromium /usr/bin/chromium

Serves the packaged toy model with uvicorn on a free loopback port, opens the
page in headless chromium (the system one, through playwright), asks two
questions about two of the example pictures, waits for both answers and
their stats lines, and saves a screenshot of the page. Needs the dev extra
(playwright) and a chromium binary; no network.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import uvicorn
from transformers.utils import logging as transformers_logging

from idefics_kit import Generator
from idefics_kit.server import create_app

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "examples" / "images"
TURNS = (
    (IMAGES / "red_circle.png", "What color is the shape?"),
    (IMAGES / "blue_square.png", "Describe this image."),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "playground.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args(argv)
    from playwright.sync_api import expect, sync_playwright

    transformers_logging.disable_progress_bar()
    gen = Generator.from_pretrained("toy", device="cpu")
    config = uvicorn.Config(
        create_app(gen, served_model_name="toy"), host="127.0.0.1", port=0, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            print("uvicorn did not start", file=sys.stderr)
            return 1
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, headless=True)
            page = browser.new_page(viewport={"width": 1000, "height": 680}, color_scheme="light")
            page.goto(f"http://127.0.0.1:{port}/")
            expect(page.locator("#model option")).to_have_text(["toy"])
            for turn, (image, question) in enumerate(TURNS):
                page.set_input_files("#images", str(image))
                page.locator("#attachments img").wait_for()
                page.fill("#question", question)
                page.press("#question", "Enter")
                expect(page.locator(".turn.assistant .stats").nth(turn)).to_be_visible()
            page.fill("#question", "Where is the shape?")
            page.set_input_files("#images", str(IMAGES / "green_triangle.png"))
            page.locator("#attachments img").wait_for()
            page.screenshot(path=str(args.out))
            answers = page.locator(".turn.assistant .text").all_inner_texts()
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
        gen.close()
    print(f"{args.out}: {args.out.stat().st_size} bytes; answers {answers}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
