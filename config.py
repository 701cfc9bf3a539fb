"""Settings: one @dataclass per entry point, turned into command-line flags, and the errors that name them.

Every entry point (grpo.py, sft.py, eval.py, toy.py) owns one @dataclass of settings. `parse_config` turns each
field into a flag `--field-name=value` (underscores become dashes), checks the value against the field's type, and
fails with a message naming the flag on anything it cannot use. Presets are plain dicts of field -> value that
`--preset=name` applies before the other flags, so `--preset=cpu --lr=3e-4` means "the cpu preset, but lr 3e-4".
`cli` runs an entry point's main() and turns a UserError (a bad flag, file or path) into one line and exit status 2.
"""
import dataclasses
import difflib
import sys
import types
import typing


class UserError(ValueError):
    """A mistake in the input (flags, files, data): entry points print the message, not a traceback."""


class ConfigError(UserError):
    """A bad flag or setting; the message names the flag."""


def _flag(name):
    return "--" + name.replace("_", "-")


def need(cond, flag, msg):
    """A settings check: raise ConfigError naming --flag unless cond holds."""
    if not cond:
        raise ConfigError(f"--{flag.replace('_', '-')}: {msg}")


def _convert(flag, tp, text):
    """Parse the string `text` for a field of type `tp`; raise ConfigError naming `flag` if it does not fit."""
    if tp in (list, tuple):  # a bare list: comma-separated strings
        tp = list[str] if tp is list else tuple[str, ...]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X] / X | None
        non_none = [a for a in args if a is not type(None)]
        if type(None) in args and text.lower() in ("none", "null", ""):
            return None
        if len(non_none) != 1:
            raise ConfigError(f"{flag}: unsupported union type {tp}")
        return _convert(flag, non_none[0], text)
    if origin is typing.Literal:
        for a in args:
            if str(a) == text:
                return a
        raise ConfigError(f"{flag}={text!r}: must be one of {', '.join(map(str, args))}")
    if origin in (list, tuple):
        inner = args[0] if args else str
        items = [] if text.strip() == "" else [s.strip() for s in text.split(",")]
        vals = [_convert(flag, inner, s) for s in items]
        return vals if origin is list else tuple(vals)
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{flag}={text!r}: expected a boolean (true/false)")
    if tp is int:
        try:
            f = float(text)  # accept 1e3 but not 1.5
        except ValueError:
            raise ConfigError(f"{flag}={text!r}: expected an integer") from None
        if not f.is_integer():
            raise ConfigError(f"{flag}={text!r}: expected an integer")
        return int(f)
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{flag}={text!r}: expected a number") from None
    if tp is str:
        return text
    raise ConfigError(f"{flag}: unsupported field type {tp}")


def _check_value(flag, tp, value):
    """Check a Python value (from a preset) against a field type by round-tripping through text."""
    if isinstance(value, (list, tuple)):
        text = ",".join(str(v) for v in value)
    elif value is None:
        text = "none"
    else:
        text = str(value)
    return _convert(flag, tp, text)


def parse_config(cls, argv=None, presets=None):
    """Build a `cls` dataclass from command-line flags.

    argv: list of strings (default sys.argv[1:]); each is `--field-name=value`, `--field-name value`, or a bare
    `--flag` for a boolean (true). `--preset=name` applies `presets[name]` first. `--help` lists the fields.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    presets = presets or {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    by_flag = {_flag(n): n for n in fields}
    values, preset = {}, None
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            print(config_help(cls, presets))
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: settings are given as --name=value")
        key, eq, text = arg.partition("=")
        if key == "--preset":
            if not eq:
                if i >= len(argv):
                    raise ConfigError("--preset needs a value")
                text, i = argv[i], i + 1
            if text not in presets:
                raise ConfigError(f"--preset={text!r}: unknown preset; known: {', '.join(presets) or '(none)'}")
            preset = text
            continue
        if key not in by_flag:
            close = difflib.get_close_matches(key, list(by_flag) + ["--preset"], n=3)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(f"unknown flag {key}.{hint} Run with --help to list the settings.")
        name = by_flag[key]
        tp = hints[name]
        if not eq:
            if tp is bool and (i >= len(argv) or argv[i].startswith("--")):
                text = "true"
            elif i < len(argv):
                text, i = argv[i], i + 1
            else:
                raise ConfigError(f"{key} needs a value")
        values[name] = _convert(key, tp, text)  # a flag given twice: the last one wins, as in argparse
    merged = {}
    if preset is not None:
        for name, v in presets[preset].items():
            if name not in fields:
                raise ConfigError(f"preset {preset!r} sets unknown field {name!r}")
            merged[name] = _check_value(_flag(name), hints[name], v)
    merged.update(values)
    cfg = cls(**merged)
    if hasattr(cfg, "preset") and preset is not None:
        cfg.preset = preset
    return cfg


def config_help(cls, presets=None):
    hints = typing.get_type_hints(cls)
    lines = [(cls.__doc__ or cls.__name__).strip(), "", "flags (default):"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        tp = hints[f.name]
        tp = "|".join(map(str, typing.get_args(tp))) if typing.get_origin(tp) is typing.Literal else \
            getattr(tp, "__name__", str(tp))
        lines.append(f"  {_flag(f.name)}={default!r}  [{tp}]")
    if presets:
        lines.append("")
        lines.append("--preset=NAME applies one of: " + ", ".join(presets))
    return "\n".join(lines)


def cli(main, name):
    """Run an entry point's main(); a UserError prints one line naming the bad input and exits with status 2."""
    try:
        main()
    except UserError as e:
        print(f"{name}: {e}", file=sys.stderr)
        sys.exit(2)
