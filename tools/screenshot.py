"""Screenshots of pyllm's HTML pages for the README, in headless Chromium (Debian's chromium and
chromium-driver, through selenium from the test extra): the page at 1280 px wide, from the top or
scrolled to an element. Not a test (tests/test_explain.py checks the page itself).

Usage: python tools/screenshot.py PAGE.html OUT.png [--height 1400] [--at CSS_SELECTOR]
e.g.   pyllm explain "Dogs are" --generate 8 --temperature 0.7 --top-k 40 --seed 1 --html /tmp/dogs.html
       python tools/screenshot.py /tmp/dogs.html docs/explain-dogs.png
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from selenium import webdriver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--height", type=int, default=1400)
    parser.add_argument("--at", help="scroll this element (CSS selector) to the top first")
    args = parser.parse_args()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size=1280,{args.height}", "--hide-scrollbars"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        browser.get(args.page.resolve().as_uri())
        if args.at:
            browser.execute_script("document.querySelector(arguments[0]).scrollIntoView()", args.at)
        browser.save_screenshot(str(args.out))
        print(f"wrote {args.out}; console: {browser.get_log('browser') or 'no messages'}")
    finally:
        browser.quit()


if __name__ == "__main__":
    main()
