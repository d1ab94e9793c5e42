"""`conveyor sandbox run` end to end: parse, clone, run in the local sandbox, report."""

from __future__ import annotations

import argparse

from triggers.cli_sandbox import EXIT_LIMIT, EXIT_REFUSED, EXIT_TIMEOUT, register

from tests.adapters.sandbox.conftest import needs_bwrap

pytestmark = needs_bwrap


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="conveyor")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_runs_in_a_clone_and_reports_exit(repo, capsys, monkeypatch, tmp_path) -> None:
    ws, _ = repo
    monkeypatch.setenv("CONVEYOR_HOME", str(tmp_path / "home"))
    code = cli(["sandbox", "run", "--repo", str(ws), "--", "/bin/sh", "-c",
                "cat README.md; echo changed > README.md; printf '\\033[31mred\\377'; exit 4"])
    out, err = capsys.readouterr()
    assert code == 4
    assert out.startswith("hello\n") and "red\ufffd" in out and "\x1b" not in out
    assert "outcome: exited with 4" in err
    assert (ws / "README.md").read_text() == "hello\n"  # the clone changed, not the repository


def test_limits_reported(repo, capsys, monkeypatch, tmp_path) -> None:
    ws, _ = repo
    monkeypatch.setenv("CONVEYOR_HOME", str(tmp_path / "home"))
    assert cli(["sandbox", "run", "--repo", str(ws), "--timeout", "1", "--", "sh", "-c", "sleep 5"]) == EXIT_TIMEOUT
    assert "outcome: timeout: wall clock of 1s exceeded" in capsys.readouterr().err
    code = cli(["sandbox", "run", "--repo", str(ws), "--memory", "64", "--", "python3", "-c", "b = bytearray(300 << 20)"])
    assert code == EXIT_LIMIT and "outcome: memory" in capsys.readouterr().err


def test_egress_flag_and_bad_inputs(repo, capsys, monkeypatch, tmp_path) -> None:
    ws, _ = repo
    monkeypatch.setenv("CONVEYOR_HOME", str(tmp_path / "home"))
    assert cli(["sandbox", "run", "--repo", str(ws), "--allow-domain", "*.com", "--", "true"]) == EXIT_REFUSED
    assert "'*.com' is not a domain name" in capsys.readouterr().err
    assert cli(["sandbox", "run", "--repo", str(ws)]) == EXIT_REFUSED
    assert "give the command" in capsys.readouterr().err
    assert cli(["sandbox", "run", "--repo", "no-such-repo", "--", "true"]) == EXIT_REFUSED
    assert "unknown repository 'no-such-repo'" in capsys.readouterr().err
    code = cli(["sandbox", "run", "--repo", str(ws), "--allow-domain", "example.org", "--", "sh", "-c",
                "echo $HTTPS_PROXY; python3 -c \"import urllib.request as u; u.urlopen('http://10.0.0.1:443/')\" 2>&1 | tail -1"])
    out, err = capsys.readouterr()
    assert code == 0 and out.startswith("http://127.0.0.1:3128") and "403" in out
    assert "egress: deny GET http://10.0.0.1:443/: IP literal refused" in err


def test_config_repo_by_name(repo, capsys, monkeypatch, tmp_path) -> None:
    ws, _ = repo
    config = tmp_path / "conveyor.toml"
    config.write_text(f'[repos.demo]\nurl = "{ws}"\nbase = "main"\n[repos.demo.sandbox]\nwall_clock_s = 7\n')
    monkeypatch.setenv("CONVEYOR_CONFIG", str(config))
    assert cli(["sandbox", "run", "--repo", "demo", "--", "sh", "-c", "git log --oneline | wc -l"]) == 0
    assert capsys.readouterr().out.strip() == "1"
