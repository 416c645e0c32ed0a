"""A test that needs a Debian package which is missing fails with the one command that installs it."""

from __future__ import annotations

import pytest

from mengzi_ray.evaluation import caption_report
from tests import system_packages


def test_missing_chromium_fails_naming_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(system_packages, "CHROMIUM", tmp_path / "no-chromium")
    with pytest.raises(pytest.fail.Exception, match=r"Chromium .* Run: sudo make system-deps .*apt-get install -y chromium"):
        system_packages.require_chromium()


def test_missing_cjk_font_fails_naming_the_install_command(monkeypatch):
    monkeypatch.setattr(caption_report, "CJK_FONT_NAMES", ("No Such Font",))
    with pytest.raises(pytest.fail.Exception, match=r"CJK font .*fonts-wqy-microhei.* Run: sudo make system-deps"):
        system_packages.require_cjk_font()


def test_missing_java_fails_naming_the_install_command(monkeypatch):
    monkeypatch.setattr(system_packages.shutil, "which", lambda _name: None)
    with pytest.raises(pytest.fail.Exception, match=r"Java .* Run: sudo make system-deps .*default-jre-headless"):
        system_packages.require_java()


def test_present_packages_are_returned():
    assert system_packages.require_chromium().name == "chromium"
    assert system_packages.require_cjk_font().is_file()
    assert system_packages.require_java().endswith("java")
