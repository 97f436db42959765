"""Recipe files: which bits, group size, mode and method each module of a model gets.

A recipe is a small TOML file:

    name = "int4-g64"
    description = "Uniform 4-bit, groups of 64"
    bits = 4                      # default for every quantizable module
    group_size = 64
    mode = "affine"               # or mxfp4 / nvfp4 / mxfp8
    method = "rtn"                # rtn, gptq, awq, distill

    [[rules]]                     # first matching rule wins
    match = "*.self_attn.v_proj"  # glob on the module path (`model.layers.3.self_attn.v_proj`, `lm_head`;
                                  # Apertus 1.5's decoder, `model.language_model.*`, is matched as `model.*`)
    layers = [0, 1]               # optional: first and last layer index, inclusive; negative counts from the end
    bits = 6                      # any of bits / group_size / mode / method, or keep = true (full precision)

    [calibration]                 # for calibrated methods and budgets
    sequences = 32
    sequence_length = 256

    [budget]                      # optional: let measured sensitivity choose each module's width
    bits_per_weight = 3.5         # or size_gb = 4.2, or ram_gb = 8 with context = 8192
    choices = [2, 3, 4, 6]        # bit widths to choose from
    group_sizes = [64, 128]       # group sizes to choose from (default: the recipe's group_size)
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from apertus_mlx.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
MODES = {"affine": None, "mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}  # fixed (bits, group) per mode
METHODS = ("rtn", "gptq", "awq", "distill")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Assignment:
    """What one module gets: `None` bits means it stays in full precision."""

    bits: int | None
    group_size: int
    mode: str
    method: str

    @property
    def quantized(self) -> bool:
        return self.bits is not None


def layer_index(path: str) -> int | None:
    """The decoder layer a module path is in (`model.layers.3.mlp.up_proj` -> 3), or None."""
    found = _LAYER.search(f"{path}.")
    return int(found.group(1)) if found else None


@dataclass(frozen=True)
class Rule:
    match: str
    layers: tuple[int, int] | None
    settings: dict[str, Any]

    def applies(self, path: str, num_layers: int) -> bool:
        if not fnmatch.fnmatchcase(path, self.match):
            return False
        if self.layers is None:
            return True
        index = layer_index(path)
        if index is None:
            return False
        first, last = (i % num_layers for i in self.layers)
        return first <= index <= last


@dataclass(frozen=True)
class Budget:
    bits_per_weight: float | None = None
    size_gb: float | None = None
    ram_gb: float | None = None
    context: int = 8192
    choices: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    group_sizes: tuple[int, ...] = ()  # empty: the recipe's group size

    def widths(self, group_size: int) -> tuple[tuple[int, int], ...]:
        """Every (bits, group_size) a module may get."""
        return tuple((b, g) for b in self.choices for g in self.group_sizes or (group_size,))

    @property
    def target(self) -> str:
        if self.bits_per_weight is not None:
            return f"{self.bits_per_weight:g} bits per weight"
        if self.size_gb is not None:
            return f"{self.size_gb:g} GB of weights"
        return f"a {self.ram_gb:g} GB Mac, {self.context}-token context"


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    bits: int
    group_size: int
    mode: str
    method: str
    rules: tuple[Rule, ...] = ()
    calibration: dict[str, int] = field(default_factory=lambda: {"sequences": 32, "sequence_length": 256})
    budget: Budget | None = None
    source: str = ""  # the file's text, for the content hash

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()[:16]

    @property
    def needs_calibration(self) -> bool:
        methods = {self.method} | {r.settings.get("method", self.method) for r in self.rules}
        return self.budget is not None or bool(methods - {"rtn"})

    def with_target(
        self,
        bits_per_weight: float | None = None,
        size_gb: float | None = None,
        ram_gb: float | None = None,
        context: int | None = None,
    ) -> Recipe:
        """This budget recipe aimed at another target; what is not given keeps the recipe's value."""
        if self.budget is None:
            raise ConfigError(f"recipe {self.name} has no [budget] table, so it takes no size target")
        b = self.budget
        aims = {"bits_per_weight": bits_per_weight, "size_gb": size_gb, "ram_gb": ram_gb}
        if all(v is None for v in aims.values()):
            aims = {"bits_per_weight": b.bits_per_weight, "size_gb": b.size_gb, "ram_gb": b.ram_gb}
        table = {k: v for k, v in aims.items() if v is not None}
        table.update(context=context or b.context, choices=list(b.choices), group_sizes=list(b.group_sizes))
        return replace(self, budget=_parse_budget(table, f"recipe {self.name}"))

    def assign(self, path: str, num_layers: int) -> Assignment:
        """The assignment of the module at `path` (e.g. `model.layers.3.mlp.up_proj`)."""
        settings = {"bits": self.bits, "group_size": self.group_size, "mode": self.mode, "method": self.method}
        for rule in self.rules:
            if rule.applies(path, num_layers):
                if rule.settings.get("keep"):
                    return Assignment(None, self.group_size, self.mode, "rtn")
                settings.update(rule.settings)
                break
        return Assignment(settings["bits"], settings["group_size"], settings["mode"], settings["method"])


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A shipped recipe by name (`int4-g64`) or a TOML file by path."""
    path = Path(name_or_path)
    if not path.is_file():
        shipped = RECIPES_DIR / f"{name_or_path}.toml"
        if shipped.is_file():
            path = shipped
        elif path.suffix == ".toml":
            raise ConfigError(f"recipe file {path} does not exist")
        else:
            known = ", ".join(r.stem for r in sorted(RECIPES_DIR.glob("*.toml")))
            raise ConfigError(f"unknown recipe {name_or_path!r}; shipped recipes: {known}")
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path.name}: not valid TOML ({e})") from None
    return parse_recipe(data, path.name, text)


def shipped_recipes() -> list[Recipe]:
    return [load_recipe(p) for p in sorted(RECIPES_DIR.glob("*.toml"))]


_TOP = {"name", "description", "bits", "group_size", "mode", "method", "rules", "calibration", "budget"}
_RULE = {"match", "layers", "bits", "group_size", "mode", "method", "keep"}
_CALIBRATION = {"sequences", "sequence_length"}
_BUDGET = {"bits_per_weight", "size_gb", "ram_gb", "context", "choices", "group_sizes"}


def parse_recipe(data: dict[str, Any], where: str = "recipe", source: str = "") -> Recipe:
    """Validate a recipe dict; every error names the file and the key at fault."""
    _no_unknown(data, _TOP, where)
    for key in ("name", "bits", "group_size"):
        if key not in data:
            raise ConfigError(f"{where}: missing key {key!r}")
    settings = {
        "bits": data["bits"],
        "group_size": data["group_size"],
        "mode": data.get("mode", "affine"),
        "method": data.get("method", "rtn"),
    }
    _check_settings(settings, where)
    rules = []
    for i, rule in enumerate(data.get("rules", [])):
        at = f"{where}: rules[{i}]"
        if not isinstance(rule, dict):
            raise ConfigError(f"{at}: expected a table")
        _no_unknown(rule, _RULE, at)
        if not isinstance(rule.get("match"), str):
            raise ConfigError(f"{at}: 'match' must be a module path pattern such as '*.mlp.down_proj'")
        layers = rule.get("layers")
        if layers is not None and not (
            isinstance(layers, list) and len(layers) == 2 and all(isinstance(x, int) for x in layers)
        ):
            raise ConfigError(f"{at}: 'layers' must be [first, last] layer indices, e.g. [0, 1] or [-2, -1]")
        rule_settings = {k: v for k, v in rule.items() if k not in ("match", "layers")}
        if not rule_settings.get("keep"):
            _check_settings({**settings, **rule_settings}, at)
        rules.append(Rule(rule["match"], tuple(layers) if layers else None, rule_settings))
    calibration = {"sequences": 32, "sequence_length": 256}
    if "calibration" in data:
        _no_unknown(data["calibration"], _CALIBRATION, f"{where}: calibration")
        for key, value in data["calibration"].items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}: calibration.{key} must be a positive integer, got {value!r}")
        calibration.update(data["calibration"])
    if "budget" in data and settings["mode"] != "affine":
        raise ConfigError(f"{where}: a budget chooses affine widths; mode {settings['mode']} has one fixed width")
    return Recipe(
        name=data["name"],
        description=data.get("description", ""),
        rules=tuple(rules),
        calibration=calibration,
        budget=_parse_budget(data["budget"], where) if "budget" in data else None,
        source=source,
        **settings,
    )


def _check_settings(s: dict[str, Any], where: str) -> None:
    if s["mode"] not in MODES:
        raise ConfigError(f"{where}: mode {s['mode']!r} is not one of {', '.join(MODES)}")
    if s["method"] not in METHODS:
        raise ConfigError(f"{where}: method {s['method']!r} is not one of {', '.join(METHODS)}")
    fixed = MODES[s["mode"]]
    if fixed and (s["bits"], s["group_size"]) != fixed:
        raise ConfigError(f"{where}: mode {s['mode']} needs bits={fixed[0]} and group_size={fixed[1]}")
    if not fixed and s["bits"] not in BITS:
        raise ConfigError(f"{where}: bits {s['bits']!r} is not one of {', '.join(map(str, BITS))}")
    if not fixed and s["group_size"] not in GROUP_SIZES:
        raise ConfigError(f"{where}: group_size {s['group_size']!r} is not one of {', '.join(map(str, GROUP_SIZES))}")


def _parse_budget(data: Any, where: str) -> Budget:
    at = f"{where}: budget"
    if not isinstance(data, dict):
        raise ConfigError(f"{at}: expected a table")
    _no_unknown(data, _BUDGET, at)
    targets = [k for k in ("bits_per_weight", "size_gb", "ram_gb") if k in data]
    if len(targets) != 1:
        raise ConfigError(f"{at}: give exactly one of bits_per_weight, size_gb, ram_gb")
    choices = data.get("choices", Budget.choices)
    if not isinstance(choices, (list, tuple)) or not choices or any(b not in BITS for b in choices):
        raise ConfigError(f"{at}: choices must be bit widths from {', '.join(map(str, BITS))}")
    groups = data.get("group_sizes", ())
    if not isinstance(groups, (list, tuple)) or any(g not in GROUP_SIZES for g in groups):
        raise ConfigError(f"{at}: group_sizes must be from {', '.join(map(str, GROUP_SIZES))}")
    value = data[targets[0]]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{at}: {targets[0]} must be a positive number, got {value!r}")
    context = data.get("context", Budget.context)
    if not isinstance(context, int) or context < 1:
        raise ConfigError(f"{at}: context must be a positive number of tokens, got {context!r}")
    return Budget(
        **{k: v for k, v in data.items() if k not in ("choices", "group_sizes")},
        choices=tuple(sorted(set(choices))),
        group_sizes=tuple(sorted(set(groups))),
    )


def _no_unknown(table: dict[str, Any], known: set[str], where: str) -> None:
    if unknown := sorted(set(table) - known):
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
