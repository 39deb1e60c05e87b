"""Settings: environment > TOML file > defaults; every bad key or value is named in the error."""

from __future__ import annotations

from pathlib import Path

import pytest

from mldash.config import FIELDS, Settings, parse_size
from mldash.errors import ConfigError


@pytest.fixture
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Defaults and the default config file location point into tmp_path."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path


def _toml(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "mldash.toml"
    path.write_text(text)
    return {"MLDASH_CONFIG": str(path)}


def test_defaults_need_no_setup(xdg: Path) -> None:
    settings = Settings.load(env={})
    assert settings.spool == xdg / "data" / "mldash" / "spool"
    assert settings.store == (xdg / "data" / "mldash" / "store").as_uri()
    assert settings.catalog == "sqlite://" + str(xdg / "data" / "mldash" / "catalog.sqlite")
    assert settings.durability == "process" and settings.spool_quota is None and settings.autostart is True


def test_precedence_env_over_toml_over_default(xdg: Path) -> None:
    env = _toml(xdg, 'spool = "/from/toml"\nsave_timeout = 5\nspool_quota = "2GiB"\n')
    env["MLDASH_SPOOL"] = "/from/env"
    settings = Settings.load(env=env)
    assert settings.spool == Path("/from/env")         # env wins over the file
    assert settings.save_timeout == 5.0                # the file wins over the default
    assert settings.spool_quota == 2 * 2**30
    assert settings.max_attempts == 20                 # default
    assert Settings.load(env=env, spool="/from/arg").spool == Path("/from/arg")  # explicit arguments win


def test_default_config_file_location(xdg: Path) -> None:
    (xdg / "config" / "mldash").mkdir(parents=True)
    (xdg / "config" / "mldash" / "config.toml").write_text('[mldash]\nsave_timeout = 7\n')
    assert Settings.load(env={}).save_timeout == 7.0


def test_empty_env_value_means_unset(xdg: Path) -> None:
    env = _toml(xdg, "save_timeout = 9\n")
    env["MLDASH_SAVE_TIMEOUT"] = ""
    assert Settings.load(env=env).save_timeout == 9.0


def test_unknown_toml_key_is_named_with_the_closest_key(xdg: Path) -> None:
    env = _toml(xdg, 'spool = "/s"\nspool_qouta = "1GB"\n')
    with pytest.raises(ConfigError, match=r"unknown key 'spool_qouta' in '.*mldash.toml'; did you mean 'spool_quota'\? "
                                          r"\(known keys: spool, store,"):
        Settings.load(env=env)
    with pytest.raises(ConfigError, match=r"unknown key 'colour' in '.*mldash.toml' \(known keys: spool, store,"):
        Settings.load(env=_toml(xdg, 'colour = "blue"\n'))


def test_unknown_key_next_to_an_mldash_table_is_named(xdg: Path) -> None:
    env = _toml(xdg, 'spool_qouta = "1GB"\n[mldash]\nspool = "/s"\n')
    with pytest.raises(ConfigError, match="unknown key 'spool_qouta'"):
        Settings.load(env=env)


def test_mldash_key_that_is_not_a_table(xdg: Path) -> None:
    with pytest.raises(ConfigError, match="'mldash'"):
        Settings.load(env=_toml(xdg, "mldash = 1\n"))


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("save_timeout", '"soon"', "'soon' is not a number; expected one ≥ 0"),
    ("stop_grace", '"later"', "'later' is not a number; expected one ≥ 0"),
    ("stop_grace", "-5", "must be ≥ 0"),
    ("max_attempts", '"many"', "'many' is not an integer; expected one ≥ 1"),
    ("save_timeout", "-1", "must be ≥ 0"),
    ("spool_quota", '"lots"', "'lots' is not a size"),
    ("durability", '"sometimes"', "'sometimes': accepted durability levels"),
    ("store", '"http://example.com/bucket"', "accepted stores are"),
    ("store", '"s3:/bucket"', "'s3:/bucket': no bucket; write 's3://bucket[/root-prefix]' (two slashes"),
    ("store", '"S3://Bucket_X"', "'Bucket_X' is not a valid S3 bucket name: 3–63 lowercase letters"),
    ("catalog", '"sqlite://relative.db"', "sqlite:///abs/file"),
    ("autostart", '"maybe"', "'maybe' is not a boolean"),
    ("max_attempts", "0", "must be ≥ 1"),
    ("max_attempts", "2.5", "is not an integer"),
    ("experiment", '"only/two"', "namespace/project/experiment"),
    # A TOML value of the wrong type is refused, never turned into text (`spool = true` made a spool "./True").
    ("spool", "true", "True is a bool; expected a string such as '/scratch/mldash/spool'"),
    ("spool", "0", "0 is an int; expected a string"),
    ("spool", '["/a", "/b"]', "is a list; expected a string"),
    ("mongo_database", "12", "12 is an int; expected a string such as 'mldash'"),
    ("mongo_database", '"my.db"', "a MongoDB database name is 1–63 bytes"),
    ("mongo_database", '""', "a MongoDB database name is 1–63 bytes"),
    ("s3_region", "false", "False is a bool; expected a string such as 'us-east-1'"),
    ("s3_endpoint_url", "9000", "9000 is an int; expected a string such as 'http://127.0.0.1:9000'"),
    ("s3_endpoint_url", '"minio:9000"', "expected an http:// or https:// URL"),
    ("experiment", '"a/../c"', "'a/../c': project '..' has component '..'"),
    ("experiment", '"team//run"', "expected 'namespace/project/experiment'"),
])
def test_bad_toml_values_name_the_key(xdg: Path, key: str, value: str, fragment: str) -> None:
    env = _toml(xdg, f"{key} = {value}\n")
    with pytest.raises(ConfigError) as info:
        Settings.load(env=env)
    message = str(info.value)
    assert message.startswith(f"{key} (") and "mldash.toml" in message and fragment in message, message


@pytest.mark.parametrize(("name", "value"), [
    ("MLDASH_SAVE_TIMEOUT", "abc"), ("MLDASH_SPOOL_QUOTA", "12 parsecs"), ("MLDASH_AUTOSTART", "perhaps"),
    ("MLDASH_STORE", "ftp://x"), ("MLDASH_DURABILITY", "disk"), ("MLDASH_MAX_CONCURRENT_FILES", "0"),
])
def test_bad_env_values_name_the_variable(xdg: Path, name: str, value: str) -> None:
    field = next(f for f in FIELDS if f.env == name)
    with pytest.raises(ConfigError) as info:
        Settings.load(env={name: value})
    message = str(info.value)
    assert message.startswith(f"{field.name} (environment variable {name})") and repr(value) in message, message


FLOAT_FIELDS = [f for f in FIELDS if isinstance(f.default(), float)]


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity", "1e999"])
@pytest.mark.parametrize("field", FLOAT_FIELDS, ids=lambda f: f.env)
def test_non_finite_numbers_are_refused(xdg: Path, field, value: str) -> None:
    """float() takes "inf" and "nan": MLDASH_STOP_GRACE=inf was a grace period that never ends."""
    with pytest.raises(ConfigError) as info:
        Settings.load(env={field.env: value})
    assert str(info.value).startswith(f"{field.name} (environment variable {field.env}): {value!r} is not a "
                                      "finite number"), str(info.value)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_toml_floats_are_refused(xdg: Path, value: str) -> None:
    assert len(FLOAT_FIELDS) >= 8  # every duration and delay
    with pytest.raises(ConfigError, match=rf"stop_grace \(.*mldash.toml\): {value} is not a finite number"):
        Settings.load(env=_toml(xdg, f"stop_grace = {value}\n"))


def test_cross_field_checks_name_the_keys(xdg: Path) -> None:
    with pytest.raises(ConfigError, match=r"part_size = 1048576 bytes; S3 needs at least 5 MiB"):
        Settings.load(env={}, part_size="1MiB")
    with pytest.raises(ConfigError, match=r"multipart_threshold \(6291456\) must be ≥ part_size \(8388608\)"):
        Settings.load(env={}, multipart_threshold="6MiB")
    with pytest.raises(ConfigError, match=r"multipart_threshold \(6291456\) must be ≥ part_size \(8388608\) "
                       r"\(multipart_threshold from environment variable MLDASH_MULTIPART_THRESHOLD; part_size "
                       r"from .*mldash.toml\)"):
        Settings.load(env={"MLDASH_MULTIPART_THRESHOLD": "6MiB", **_toml(xdg, 'part_size = "8MiB"\n')})
    # A retry_max_delay below the default base delay is fine: the max caps every delay (it used to be refused).
    assert Settings.load(env={"MLDASH_RETRY_MAX_DELAY": "0.5"}).retry_max_delay == 0.5
    with pytest.raises(ConfigError, match=r"part_size from the settings replace\(\) was called on"):
        Settings.load(env={}).replace(multipart_threshold="6MiB")
    with pytest.raises(ConfigError, match=r"log_level = 'VERBOSE'.* \(log_level from argument\)"):
        Settings.load(env={}, log_level="VERBOSE")
    with pytest.raises(ConfigError, match=r"\(multipart_threshold from the default; part_size from environment"):
        Settings.load(env={"MLDASH_PART_SIZE": "32MiB"})


def test_unknown_argument_and_missing_or_broken_file(xdg: Path) -> None:
    with pytest.raises(ConfigError, match="unknown setting 'spoll'"):
        Settings.load(env={}, spoll="/x")
    with pytest.raises(ConfigError, match=r"config file '.*nope.toml' \(from MLDASH_CONFIG\) does not exist"):
        Settings.load(env={"MLDASH_CONFIG": str(xdg / "nope.toml")})
    with pytest.raises(ConfigError, match="is not valid TOML"):
        Settings.load(env=_toml(xdg, "spool = \n"))


@pytest.mark.parametrize(("text", "size"), [
    ("512MiB", 512 * 2**20), ("1.5 GiB", int(1.5 * 2**30)), ("10GB", 10**10), ("0", 0), (4096, 4096), ("7b", 7),
    ("1.1MB", 1_100_000), ("0.9KB", 900),
])
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["-1", "1 PB", "", "MiB", True, -5, "0.5", "1.5 B", "0.4KiB"])
def test_bad_sizes(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("value", ["0", "none", "unlimited", "", "0B", "0 GiB", "None"])
def test_quota_can_be_unset(xdg: Path, value: str) -> None:
    assert Settings.load(env={"MLDASH_SPOOL_QUOTA": value}).spool_quota is None


@pytest.mark.parametrize(("value", "size"), [("200", 200), ("5", 5), ("1000KB", 10**6), ("1048575", 2**20 - 1)])
def test_a_quota_below_a_mebibyte_is_refused_as_a_missing_unit(xdg: Path, value: str, size: int) -> None:
    """MLDASH_SPOOL_QUOTA=200 meant 200 bytes: every save then waited save_timeout and failed."""
    with pytest.raises(ConfigError) as info:
        Settings.load(env={"MLDASH_SPOOL_QUOTA": value})
    assert str(info.value) == (f"spool_quota (environment variable MLDASH_SPOOL_QUOTA): {value!r} is {size} bytes, "
                               "below the smallest quota of 1MiB; give a unit, e.g. '50GiB' or '500MB' (0 = no quota)")
    assert Settings.load(env={"MLDASH_SPOOL_QUOTA": "1MiB"}).spool_quota == 2**20


def test_a_quota_below_a_mebibyte_in_the_file_is_refused(xdg: Path) -> None:
    with pytest.raises(ConfigError, match=r"spool_quota \(.*mldash.toml\): 5 is 5 bytes, below the smallest quota "
                                          r"of 1MiB; give a unit, e.g. '50GiB' or '500MB'"):
        Settings.load(env=_toml(xdg, "spool_quota = 5\n"))
    assert Settings.load(env=_toml(xdg, "spool_quota = 0\n")).spool_quota is None


def test_config_file_that_cannot_be_read_is_named(xdg: Path) -> None:
    folder = xdg / "dir.toml"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"config file '.*dir.toml' is a directory, not a TOML file"):
        Settings.load(env={"MLDASH_CONFIG": str(folder)})
    latin1 = xdg / "latin1.toml"
    latin1.write_bytes('spool = "/tmp/é"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"is not UTF-8 \(byte 0xe9 at offset 14\); TOML files must be UTF-8"):
        Settings.load(env={"MLDASH_CONFIG": str(latin1)})


@pytest.mark.parametrize(("name", "value", "secret"), [
    ("MLDASH_CATALOG", "mongo://mldash:S3cret-Passw0rd@db.example.org/?authSource=admin", "S3cret-Passw0rd"),
    ("MLDASH_CATALOG", "mongo://mldash:p@ss@db.example.org/", "p@ss"),
    ("MLDASH_STORE", "s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI@My_Bucket/x", "wJalrXUtnFEMI"),
    ("MLDASH_STORE", "s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI@bucket/x", "wJalrXUtnFEMI"),
    ("MLDASH_S3_ENDPOINT_URL", "minio://user:hunter2@host:9000", "hunter2"),
])
def test_config_errors_never_show_a_password(xdg: Path, name: str, value: str, secret: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(env={name: value})
    message = str(info.value)
    assert secret not in message and ":***@" in message, message


def test_replace_parses_and_checks_like_load(xdg: Path) -> None:
    """`Settings.replace` used to skip every check: an 8 MiB inline_max went through, and the daemon then
    quarantined the manifest it produced."""
    settings = Settings.load(env={})
    with pytest.raises(ConfigError, match=r"inline_max = 8388608 bytes; at most 1048576"):
        settings.replace(inline_max="8MiB")
    with pytest.raises(ConfigError, match=r"checksum \(argument\): 'bogus': accepted checksum modes"):
        settings.replace(checksum="bogus")
    with pytest.raises(ConfigError, match="unknown setting 'spoll'"):
        settings.replace(spoll="/x")
    assert settings.replace(spool_quota="2MiB", save_timeout=5).spool_quota == 2 * 2**20
    # None means the default, in replace and in load alike (it used to be stored as None and fail later).
    assert settings.replace(spool="/elsewhere").replace(spool=None).spool == settings.spool
    assert Settings.load(env={}, spool=None, max_file_size=None) == settings


def test_a_misspelt_variable_is_warned_about_once(xdg: Path, caplog: pytest.LogCaptureFixture) -> None:
    from mldash import config

    config._warned_variables.discard("MLDASH_SPOOL_QUOTE")
    env = {"MLDASH_SPOOL_QUOTE": "10GiB", "MLDASH_TEST_ANYTHING": "1", "MLDASH_CONFIG": "", "MLDASH_SPOOL": "/s"}
    with caplog.at_level("WARNING", logger="mldash"):
        settings = Settings.load(env=env)
        Settings.load(env=env)
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["environment variable MLDASH_SPOOL_QUOTE is not an mldash setting and is ignored; did you "
                        "mean MLDASH_SPOOL_QUOTA?"], warnings
    assert settings.spool_quota is None


def test_a_relative_spool_in_the_config_file_is_relative_to_that_file(xdg: Path, monkeypatch) -> None:
    """It resolved against the job's working directory: every job started elsewhere got a spool of its own."""
    monkeypatch.chdir(xdg)
    folder = xdg / "cfg"
    folder.mkdir()
    (folder / "mldash.toml").write_text('spool = "relative/spool"\n')
    settings = Settings.load(env={"MLDASH_CONFIG": str(folder / "mldash.toml")})
    assert settings.spool == folder / "relative" / "spool"
    assert Settings.load(env={"MLDASH_SPOOL": "relative/spool"}).spool == xdg / "relative" / "spool"  # env: cwd
