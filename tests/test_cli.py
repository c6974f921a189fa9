from __future__ import annotations

import pytest

from batcher._cli import build_parser, main


@pytest.mark.parametrize("command", ["run", "validate", "status", "simulate"])
def test_every_option_has_help(command, capsys):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help"
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: batcher" in capsys.readouterr().out


def test_help_documents_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for code in ("0", "1", "2", "3", "4", "130"):
        assert f"\n  {code} " in out


def test_bad_usage_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["run", "x.yaml", "--concurrency", "0"])
    assert exc.value.code == 2


def test_validate_reports_and_exits_2(tmp_path, capsys):
    job = tmp_path / "j.jsonl"
    job.write_text('"ok"\n{"prompt": ""}\n')
    assert main(["validate", str(job)]) == 2
    err = capsys.readouterr().err
    assert f"{job}:2: prompt: must not be empty" in err
    job.write_text('"ok"\n')
    assert main(["validate", str(job)]) == 0
