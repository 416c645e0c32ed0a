"""The Debian packages some tests need (`make system-deps` installs them): a test that needs one and finds it
missing fails with the one command that installs them, instead of an obscure error deep in the test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

PACKAGES = "chromium fonts-wqy-microhei default-jre-headless"
INSTALL = f"sudo make system-deps   (= apt-get install -y {PACKAGES})"
CHROMIUM = Path("/usr/bin/chromium")


def _missing(what: str) -> None:
    pytest.fail(f"{what} is not installed; this test needs it. Run: {INSTALL}", pytrace=False)


def require_chromium() -> Path:
    """The headless browser the web-page test drives (Debian package chromium)."""
    if not (CHROMIUM.is_file() and CHROMIUM.stat().st_mode & 0o111):
        _missing(f"Chromium ({CHROMIUM})")
    return CHROMIUM


def require_cjk_font() -> Path:
    """A font with CJK glyphs for the evaluation report's examples.png (Debian package fonts-wqy-microhei)."""
    from mengzi_ray.evaluation.caption_report import find_cjk_font

    font = find_cjk_font()
    if font is None:
        _missing("a CJK font (fonts-wqy-microhei)")
    return font


def require_java() -> str:
    """`java` on PATH: METEOR and the PTB tokenizer of pycocoevalcap (Debian package default-jre-headless)."""
    java = shutil.which("java")
    if java is None:
        _missing("Java (java on PATH)")
    return java
