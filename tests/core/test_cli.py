"""The mammolab command's dispatching and messages."""

from __future__ import annotations

import pytest

from core.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert "MammoLab" in capsys.readouterr().out


def test_two_paths_for_the_gui_is_a_usage_error(tmp_path, capsys):
    assert main([str(tmp_path / "a.png"), str(tmp_path / "b.png")]) == 2
    assert "mammolab classify" in capsys.readouterr().err


def test_classify_help_lists_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["classify", "-h"])
    assert "Exit 0" in capsys.readouterr().out
