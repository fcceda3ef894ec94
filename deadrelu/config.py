"""`[tool.deadrelu]` in the nearest pyproject.toml (or `--config FILE`), merged under the flags.

The file gives defaults; a command-line flag that is given overrides the file's key of the
same name (lists such as `ignore` are replaced, not extended). Keys are kebab-case
(`max-dead-fraction`); snake_case spellings are accepted too. Every error names the file
and the key, and exits 2.

    [tool.deadrelu]
    fail-on = "dead"                 # dead | near-dead | dormant | collapsed
    max-dead = 20                    # counted units over all sites
    max-dead-fraction = 0.05         # counted units / all units
    max-site-dead-fraction = 0.25    # in any one site
    max-new-dead = 0                 # `deadrelu diff`: units that died
    near-dead = 0.01                 # verdict thresholds, as --near-dead / --tau
    tau = 0.1
    ignore = ["head.*"]              # site-name globs left out of every gate
    baseline = "reports/main.json"   # relative to this file

    [tool.deadrelu.sites."layer4.*"]
    max-dead-fraction = 0.5          # replaces max-site-dead-fraction for these sites
    max-dead = 3                     # and caps their counted units, site by site
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from deadrelu.errors import ConfigError
from deadrelu.gates import FailOn, GatePolicy, SiteRule
from deadrelu.judge import Thresholds

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SECTION = "[tool.deadrelu]"


@dataclass(frozen=True)
class Settings:
    """Gate and verdict settings; None means "not set here" (a default or the other source applies)."""

    fail_on: FailOn | None = None
    max_dead: int | None = None
    max_dead_fraction: float | None = None
    max_site_dead_fraction: float | None = None
    max_new_dead: int | None = None
    near_dead: float | None = None
    tau: float | None = None
    ignore: tuple[str, ...] | None = None
    site_rules: tuple[SiteRule, ...] | None = None
    baseline: Path | None = None
    source: Path | None = None  # the file these came from (for messages)

    def overridden_by(self, flags: Settings) -> Settings:
        """These settings with every key that `flags` sets replaced by the flag's value."""
        changes = {f.name: getattr(flags, f.name) for f in fields(self)
                   if f.name != "source" and getattr(flags, f.name) is not None}
        return replace(self, **changes)

    def policy(self) -> GatePolicy:
        return GatePolicy(
            fail_on=self.fail_on, max_dead=self.max_dead, max_dead_fraction=self.max_dead_fraction,
            max_site_dead_fraction=self.max_site_dead_fraction, ignore=self.ignore or (),
            site_rules=self.site_rules or (),
        )

    def thresholds(self, base: Thresholds | None = None) -> Thresholds:
        base = base or Thresholds()
        return Thresholds(near_dead=base.near_dead if self.near_dead is None else self.near_dead,
                          tau=base.tau if self.tau is None else self.tau)

    @property
    def sets_thresholds(self) -> bool:
        return self.near_dead is not None or self.tau is not None


def find_pyproject(start: Path | None = None) -> Path | None:
    """The nearest pyproject.toml, from `start` (default: the working directory) upwards,
    that has a [tool.deadrelu] table."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file() and _section(_read_toml(candidate), candidate, required=False) is not None:
            return candidate
    return None


def load_settings(config: Path | None = None, start: Path | None = None) -> Settings:
    """Settings from `config` (a pyproject.toml or a TOML file of these keys), else from the
    nearest pyproject.toml with [tool.deadrelu]; empty Settings when there is none."""
    if config is not None:
        doc = _read_toml(config)
        if config.name == "pyproject.toml" or "tool" in doc:
            return parse_settings(_section(doc, config, required=True) or {}, config, SECTION)
        return parse_settings(doc, config, "")  # a deadrelu.toml: the keys at the top level
    found = find_pyproject(start)
    if found is None:
        return Settings()
    return parse_settings(_section(_read_toml(found), found, required=True) or {}, found, SECTION)


def parse_settings(table: dict[str, Any], path: Path, where: str = SECTION) -> Settings:
    """Validate one [tool.deadrelu] table; every error names `path`, the table and the key."""
    place = f"{path}: {where + ' ' if where else ''}"
    values: dict[str, Any] = {"source": path}
    _refuse_two_spellings(table, place)
    for raw_key, value in table.items():
        key = raw_key.replace("_", "-")
        if key == "sites":
            values["site_rules"] = _site_rules(value, path, where)
            continue
        spec = _KEYS.get(key)
        if spec is None:
            known = ", ".join(sorted((*_KEYS, "sites")))
            raise ConfigError(f"{place}{raw_key}: unknown key (known keys: {known})")
        values[key.replace("-", "_")] = spec(value, f"{place}{raw_key}", path)
    return Settings(**values)


# --- validation ------------------------------------------------------------------------------

def _refuse_two_spellings(table: dict[str, Any], place: str) -> None:
    """max-dead and max_dead are one key: given both, which wins would be a guess."""
    spellings: dict[str, list[str]] = {}
    for raw_key in table:
        spellings.setdefault(raw_key.replace("_", "-"), []).append(raw_key)
    for given in spellings.values():
        if len(given) > 1:
            raise ConfigError(f"{place}{' and '.join(given)}: one key spelt {len(given)} ways; keep one")


def _count(value: Any, name: str, _path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name}: expected an integer >= 0, got {value!r}")
    return value


def _fraction(value: Any, name: str, _path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value <= 1) or math.isnan(value):
        raise ConfigError(f"{name}: expected a number from 0 to 1, got {value!r}")
    return float(value)


def _non_negative(value: Any, name: str, _path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ConfigError(f"{name}: expected a finite number >= 0, got {value!r}")
    return float(value)


def _fail_on(value: Any, name: str, _path: Path) -> FailOn:
    try:
        return FailOn(value)
    except ValueError:
        choices = " | ".join(k.value for k in FailOn)
        raise ConfigError(f"{name}: expected one of {choices}, got {value!r}") from None


def _globs(value: Any, name: str, _path: Path) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{name}: expected a list of site-name globs, got {value!r}")
    return tuple(value)


def _path(value: Any, name: str, path: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name}: expected a path to a JSON report, got {value!r}")
    return (path.parent / value) if not Path(value).is_absolute() else Path(value)


_KEYS = {
    "fail-on": _fail_on,
    "max-dead": _count,
    "max-dead-fraction": _fraction,
    "max-site-dead-fraction": _fraction,
    "max-new-dead": _count,
    "near-dead": _fraction,
    "tau": _non_negative,
    "ignore": _globs,
    "baseline": _path,
}  # and "sites": per-site rules, see _site_rules
_SITE_KEYS = {"max-dead": _count, "max-dead-fraction": _fraction}


def _site_rules(value: Any, path: Path, where: str) -> tuple[SiteRule, ...]:
    table = f"{where[:-1]}.sites]" if where else "[sites]"
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {table}: expected a table of site-name globs, "
                          f'e.g. [tool.deadrelu.sites."layer4.*"]')
    rules = []
    for pattern, limits in value.items():
        head = f'{path}: {table[:-1]}."{pattern}"]'
        if not isinstance(limits, dict):
            raise ConfigError(f"{head}: expected a table with max-dead and/or max-dead-fraction, got {limits!r}")
        parsed: dict[str, Any] = {}
        _refuse_two_spellings(limits, f"{head} ")
        for raw_key, limit in limits.items():
            key = raw_key.replace("_", "-")
            check = _SITE_KEYS.get(key)
            if check is None:
                raise ConfigError(f"{head} {raw_key}: unknown key (known keys: {', '.join(_SITE_KEYS)})")
            parsed[key.replace("-", "_")] = check(limit, f"{head} {raw_key}", path)
        rules.append(SiteRule(pattern, **parsed))
    return tuple(rules)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (expected TOML)") from None


def _section(doc: dict[str, Any], path: Path, required: bool) -> dict[str, Any] | None:
    tool = doc.get("tool")
    table = tool.get("deadrelu") if isinstance(tool, dict) else None
    if table is None:
        if required:
            raise ConfigError(f"{path}: no {SECTION} table")
        return None
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: tool.deadrelu: expected a table, got {table!r}")
    return table
