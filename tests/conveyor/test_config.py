"""conveyor.toml parsing and lookup: real files on disk, real environment precedence."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conveyor.config import ConfigError, Settings, adhoc_repo_policy, load_config, local_user, parse_config

FULL = """\
# every key the issue names
[repos.web]
url = "/srv/git/web.git"
base = "develop"
agent = "claude-code"
test_command = "make test"
invokers = ["slack:U1", "local:alice"]
approvers = ["U2"]
reverters = ["*"]
approver_must_differ = true
max_files_changed = 12
max_diff_lines = 400
max_patch_bytes = 100000
max_turns = 9
max_cost_usd = 1.5
review_timeout_s = 3600
revert_window_s = 7200

[repos.web.sandbox]
backend = "local"
allow_domains = ["pypi.org", "*.pythonhosted.org"]
allow_ports = [443, 8443]
setup_command = "pip install -e ."
cpus = 2.0
memory_mb = 1024
pids = 64
wall_clock_s = 300
env = { LANG = "C.UTF-8" }

[repos.api]
url = "https://github.com/acme/api"
host = "github"
"""


def test_full_file_parses_every_key():
    config = parse_config(FULL)
    web = config.repo("web")
    assert web.name == "web" and web.url == "/srv/git/web.git" and web.base == "develop"
    assert web.agent == "claude-code" and web.test_command == "make test"
    assert web.invokers == ["slack:U1", "local:alice"] and web.approvers == ["U2"] and web.reverters == ["*"]
    assert web.approver_must_differ is True
    assert (web.max_files_changed, web.max_diff_lines, web.max_patch_bytes, web.max_turns) == (12, 400, 100000, 9)
    assert web.max_cost_usd == 1.5 and web.review_timeout_s == 3600 and web.revert_window_s == 7200
    sb = web.sandbox
    assert sb.allow_domains == ["pypi.org", "*.pythonhosted.org"] and sb.allow_ports == [443, 8443]
    assert (sb.cpus, sb.memory_mb, sb.pids, sb.wall_clock_s) == (2.0, 1024, 64, 300)
    assert sb.setup_command == "pip install -e ." and sb.env == {"LANG": "C.UTF-8"}
    api = config.repo("api")
    assert api.host == "github" and api.base == "main" and api.sandbox.allow_domains == []  # defaults


def test_malformed_toml_names_the_line():
    text = '[repos.web]\nurl = "/x"\nbase = main\n'  # unquoted string on line 3
    with pytest.raises(ConfigError) as err:
        parse_config(text, Path("/etc/conveyor.toml"))
    assert "/etc/conveyor.toml" in str(err.value) and "line 3" in str(err.value)


@pytest.mark.parametrize(
    "key_line, dotted, line",
    [
        ('approver_must_differ = "yes"', "repos.web.approver_must_differ", 4),
        ('max_files_changed = "x"', "repos.web.max_files_changed", 4),
        ("invokers = 7", "repos.web.invokers", 4),
    ],
)
def test_wrong_type_names_key_and_line(key_line, dotted, line):
    text = f'# header comment\n[repos.web]\nurl = "/x"\n{key_line}\n'
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    msg = str(err.value)
    assert dotted in msg and f"(line {line})" in msg, msg


def test_wrong_type_in_sandbox_table_names_key_and_line():
    # The same key name appears earlier in another repo: the line must be the one in repos.web.sandbox.
    text = (
        '[repos.other]\nurl = "/o"\n[repos.other.sandbox]\nmemory_mb = 64\n\n'
        '[repos.web]\nurl = "/x"\n\n[repos.web.sandbox]\ncpus = 1\nmemory_mb = "lots"\n'
    )
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    msg = str(err.value)
    assert "repos.web.sandbox.memory_mb" in msg and "(line 11)" in msg, msg


def test_unknown_key_is_named():
    with pytest.raises(ConfigError) as err:
        parse_config('[repos.web]\nurl = "/x"\napprovers_typo = ["a"]\n')
    assert "repos.web.approvers_typo" in str(err.value) and "(line 3)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config('[repos.web]\nurl = "/x"\n[repos.web.sandbox]\nallow_everything = true\n')
    assert "repos.web.sandbox.allow_everything" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config('[repo.web]\nurl = "/x"\n')
    assert "repo" in str(err.value) and "[repos.NAME]" in str(err.value)


@pytest.mark.parametrize("domain", ["*", "*.com", "*.", "exa mple.com", "http://pypi.org"])
def test_too_broad_or_invalid_egress_refused(domain):
    for key in ("allow_domains", "setup_allow_domains"):
        text = f'[repos.web]\nurl = "/x"\n[repos.web.sandbox]\n{key} = ["pypi.org", "{domain}"]\n'
        with pytest.raises(ConfigError) as err:
            parse_config(text)
        assert f"repos.web.sandbox.{key}" in str(err.value) and "(line 4)" in str(err.value)


def test_missing_url_is_named():
    with pytest.raises(ConfigError) as err:
        parse_config("[repos.web]\nbase = \"main\"\n")
    assert "repos.web.url" in str(err.value)


def test_unknown_repository_lists_known_ones():
    config = parse_config(FULL)
    with pytest.raises(ConfigError) as err:
        config.repo("mobile")
    assert "'mobile'" in str(err.value) and "api, web" in str(err.value)
    with pytest.raises(ConfigError, match="none configured"):
        parse_config("").repo("web")


def test_allows_star_bare_ids_and_principals():
    web = parse_config(FULL).repo("web")
    assert web.allows("invokers", "slack:U1", "U1")
    assert web.allows("invokers", "local:alice", "alice")
    assert not web.allows("invokers", "slack:alice", "alice2")  # kind:id must match exactly
    assert not web.allows("invokers", "github:U1", "U9")
    assert web.allows("approvers", "slack:U2", "U2")  # a bare id is a Slack user id
    # ...and only that: a GitHub login, local user or Linear id spelled "U2" is someone else
    assert not web.allows("approvers", "github:U2", "U2")
    assert not web.allows("approvers", "local:U2", "U2")
    assert not web.allows("approvers", "linear:U2", "U2")
    assert not web.allows("approvers", "slack:U1", "U1")
    assert web.allows("reverters", "linear:anyone", "anyone")  # "*"
    assert not parse_config(FULL).repo("api").allows("invokers", "local:alice", "alice")  # empty list: nobody


def test_adhoc_policy_for_a_path(tmp_path):
    repo = tmp_path / "proj.git"
    repo.mkdir()
    policy = adhoc_repo_policy(str(repo), base="trunk")
    me = f"local:{local_user()}"
    assert policy.url == str(repo.resolve()) and policy.base == "trunk"
    assert policy.name.startswith("proj-")
    for role in ("invokers", "approvers", "reverters"):
        assert policy.allows(role, me, local_user())
        assert not policy.allows(role, "slack:U1", "U1")
    other = tmp_path / "b" / "proj.git"
    other.mkdir(parents=True)
    assert adhoc_repo_policy(str(other)).name != policy.name  # same basename, different repo
    with pytest.raises(ConfigError, match="does not exist"):
        adhoc_repo_policy(str(tmp_path / "missing"))


VALID = '[repos.{name}]\nurl = "/x"\n'


def test_load_config_precedence(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    explicit = tmp_path / "explicit.toml"
    explicit.write_text(VALID.format(name="explicit"))
    (home / "conveyor.toml").write_text(VALID.format(name="home"))
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("CONVEYOR_CONFIG", raising=False)
    monkeypatch.setenv("CONVEYOR_HOME", str(home))

    assert list(load_config(Settings()).repos) == ["home"]
    (cwd / "conveyor.toml").write_text(VALID.format(name="cwd"))
    assert list(load_config(Settings()).repos) == ["cwd"]  # ./conveyor.toml beats CONVEYOR_HOME
    monkeypatch.setenv("CONVEYOR_CONFIG", str(explicit))
    config = load_config(Settings())
    assert list(config.repos) == ["explicit"] and config.source == explicit  # CONVEYOR_CONFIG beats both

    monkeypatch.setenv("CONVEYOR_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="CONVEYOR_CONFIG"):
        load_config(Settings())

    monkeypatch.delenv("CONVEYOR_CONFIG")
    os.remove(cwd / "conveyor.toml")
    os.remove(home / "conveyor.toml")
    assert load_config(Settings()).repos == {}  # nothing configured is not an error

    bad = tmp_path / "bad.toml"
    bad.write_text('[repos.web]\nurl = "/x"\nmax_turns = "many"\n')
    monkeypatch.setenv("CONVEYOR_CONFIG", str(bad))
    with pytest.raises(ConfigError) as err:
        load_config(Settings())
    assert str(bad) in str(err.value) and "repos.web.max_turns (line 3)" in str(err.value)


def test_name_key_cannot_override_the_table_name():
    with pytest.raises(ConfigError) as err:
        parse_config('[repos.web]\nurl = "/x"\nname = "prod"\n')
    assert "repos.web.name (line 3)" in str(err.value)


def test_quoted_repo_name_line_numbers():
    text = '[repos."acme.web"]\nurl = "/x"\n\n[repos."acme.web".sandbox]\npids = "many"\n'
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert 'repos.acme.web.sandbox.pids (line 5)' in str(err.value)
    assert parse_config('[repos."acme.web"]\nurl = "/x"\n').repo("acme.web").url == "/x"


def test_local_user_is_the_os_account_not_the_environment(monkeypatch):
    import pwd

    real = pwd.getpwuid(os.geteuid()).pw_name
    for var in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.setenv(var, "someone-else")
    assert local_user() == real != "someone-else"
