"""Settings are type- and range-checked where they are read, with one line naming the source, setting and fix."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from gpuwatch.config import ALLOWED, ConfigError, Settings, check_settings, load_settings


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gpuwatch.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("partitions = 2.7", "partitions = 2.7: must be an integer >= 1"),
        ("partitions = true", "partitions = true: must be an integer >= 1"),
        ('partitions = "8"', 'partitions = "8": must be an integer >= 1'),
        ("partitions = 0", "partitions = 0: must be an integer >= 1"),
        ("alarm_threshold = true", "alarm_threshold = true: must be a number in [0, 1]"),
        ("alarm_threshold = 5", "alarm_threshold = 5: must be a number in [0, 1]"),
        ("alarm_threshold = nan", "alarm_threshold = nan: must be a number in [0, 1]"),
        ("rescore_interval_s = 0", "rescore_interval_s = 0: must be a number in (0, 10]"),
        ("agent_xid_events = 1", "agent_xid_events = 1: must be true or false"),
        ("policy_max_concurrent_drains = -1", "policy_max_concurrent_drains = -1: must be an integer >= 0"),
        ("sink_metrics_port = 70000", "sink_metrics_port = 70000: must be an integer in [0, 65535]"),
        ("command_ttl_s = 7200", "command_ttl_s = 7200: must be a number in (0, 3600]"),
        ('controller_executor = "ansible"', 'controller_executor = "ansible": must be one of dry-run, command, '
         "webhook, slurm, kubernetes"),
        ('agent_spool_fsync = "sometimes"', 'agent_spool_fsync = "sometimes": must be one of always, interval, never'),
        ("topic_risk = 3", "topic_risk = 3: must be text"),
    ],
)  # fmt: skip
def test_a_bad_file_value_names_the_file_the_setting_and_what_it_admits(
    tmp_path: Path, line: str, message: str
) -> None:
    path = _file(tmp_path, f"[gpuwatch]\n{line}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert str(info.value).startswith(f"config file {path}: {message}")
    assert "\n" not in str(info.value)


def test_well_typed_values_load_and_an_integer_is_a_number(tmp_path: Path) -> None:
    path = _file(tmp_path, "partitions = 3\nalarm_threshold = 1\nagent_xid_events = false\ndevice = 'cpu'\n")
    settings = load_settings(path, env={})
    assert (settings.partitions, settings.alarm_threshold, settings.agent_xid_events) == (3, 1.0, False)
    assert isinstance(settings.alarm_threshold, float)


def test_environment_text_is_parsed_and_checked_the_same_way() -> None:
    env = {"GPUWATCH_PARTITIONS": "4", "GPUWATCH_ALARM_THRESHOLD": "0.5", "GPUWATCH_AGENT_XID_EVENTS": "off"}
    settings = load_settings(env=env)
    assert (settings.partitions, settings.alarm_threshold, settings.agent_xid_events) == (4, 0.5, False)
    for var, value, message in [
        ("GPUWATCH_PARTITIONS", "2.7", "environment variable GPUWATCH_PARTITIONS=2.7: must be an integer >= 1"),
        ("GPUWATCH_ALARM_THRESHOLD", "5", "environment variable GPUWATCH_ALARM_THRESHOLD=5: must be a number in"),
        ("GPUWATCH_STALE_AFTER_S", "inf", "environment variable GPUWATCH_STALE_AFTER_S=inf: must be a number > 0"),
        ("GPUWATCH_AGENT_XID_EVENTS", "maybe", "environment variable GPUWATCH_AGENT_XID_EVENTS=maybe: must be true "
         "or false"),
    ]:
        with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace("[", r"\[")):
            load_settings(env={var: value})


def test_command_line_overrides_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"^setting agent_interval_s = 0.0: must be a number > 0$"):
        load_settings(env={}, agent_interval_s=0.0)


def test_a_secret_is_never_echoed(tmp_path: Path) -> None:
    path = _file(tmp_path, "kafka_sasl_password = 123456789\n")
    with pytest.raises(ConfigError, match=r"kafka_sasl_password = \*\*\*: must be text") as info:
        load_settings(path, env={})
    assert "123456789" not in str(info.value)


def test_unreadable_files_are_one_line_errors(tmp_path: Path) -> None:
    for path, message in [
        (tmp_path, f"config file {tmp_path} is a directory; give the path of a TOML file in it"),
        (tmp_path / "none.toml", f"config file {tmp_path / 'none.toml'} does not exist; give the path of a TOML file"),
        ("partitions = \n", f"config file {tmp_path / 'gpuwatch.toml'} is not valid TOML"),
        ("nope = 1\n", f"config file {tmp_path / 'gpuwatch.toml'}: unknown setting 'nope'"),
    ]:  # fmt: skip
        if isinstance(path, str):
            path = _file(tmp_path, path)
        with pytest.raises(ConfigError) as info:
            load_settings(path, env={})
        assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_the_defaults_pass_and_every_numeric_setting_has_a_range() -> None:
    check_settings(Settings())
    numeric = {f.name for f in fields(Settings) if type(f.default) in (int, float)}
    assert numeric <= set(ALLOWED)
    with pytest.raises(ConfigError, match=r"^setting redis_history_len = 0: must be an integer >= 1$"):
        check_settings(Settings(redis_history_len=0))
