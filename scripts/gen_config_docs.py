"""Regenerate docs/configuration.md from mldash.config.FIELDS (a test checks it is current)."""

from __future__ import annotations

import sys
from pathlib import Path

from mldash.config import FIELDS

HEADER = """# Configuration

Every setting can come from an environment variable or from a TOML file; the environment wins.
The file is `$MLDASH_CONFIG` if set, else `$XDG_CONFIG_HOME/mldash/config.toml`
(`~/.config/mldash/config.toml`). Keys are the names in the first column, either at the top level or
in an `[mldash]` table. Unknown keys and invalid values are errors that name the key and where it
came from (a value of the wrong TOML type too: `spool = true` is refused, not read as "True"; passwords in
URLs are shown as `***`); an unknown key comes with the closest known one (`spool_qouta`: did you mean
`spool_quota`?). An `MLDASH_*` environment variable that is no setting (a typo such as
`MLDASH_SPOOL_QUOTE`) is logged as a warning naming the closest setting. With nothing set, everything
lives under `$XDG_DATA_HOME/mldash` (`~/.local/share/mldash`): a spool, a directory store and a SQLite
catalog — no services needed.

```toml
# ~/.config/mldash/config.toml
store = "s3://my-bucket/mldash"
catalog = "mongodb://mldash:secret@db.example.org/?authSource=admin"
spool_quota = "200GiB"
```

Sizes accept bytes or units (`512MiB`, `10GB`); durations are seconds.

| key | environment variable | default | meaning |
|---|---|---|---|
"""

DEFAULTS = {
    "spool": "`$XDG_DATA_HOME/mldash/spool`",
    "store": "`file://$XDG_DATA_HOME/mldash/store`",
    "catalog": "`sqlite://$XDG_DATA_HOME/mldash/catalog.sqlite`",
    "verify_etag": "`auto`",  # held as None, which the setting reads as auto (Settings.checks_etags)
}


def render() -> str:
    rows = []
    for field in FIELDS:
        default = DEFAULTS.get(field.name)
        if default is None:
            value = field.default()
            default = "unset" if value is None else f"`{value}`"
        rows.append(f"| `{field.name}` | `{field.env}` | {default} | {field.doc} |")
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":
    target = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    if "--check" in sys.argv:
        sys.exit(0 if target.read_text() == render() else 1)
    target.write_text(render())
