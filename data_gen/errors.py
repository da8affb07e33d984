"""The one error type data_gen raises for bad input; the CLI prints it as one line and exits non-zero."""


class DataGenError(Exception):
    """A problem with the user's input (persona folder, config, templates, general data), worded for a person."""


def read_yaml(path, what: str = "file"):
    """Parse a YAML file; errors name the file and line."""
    from pathlib import Path

    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataGenError(f"{p}: {what} not found") from None
    except UnicodeDecodeError as e:
        raise DataGenError(f"{p}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise DataGenError(f"{p}{line}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
