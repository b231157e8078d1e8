"""Reading a recipe: YAML (safe loader) with line numbers, `--set key=value` overrides, paths
resolved, and every validation problem reported at once under its dotted key, with its line and a fix."""

from __future__ import annotations

import copy
import difflib
import glob
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import RecipeError
from .inputs import METHOD_TYPES
from .schema import Recipe, section_type


def _key_lines(text: str) -> tuple[dict[tuple, int], list[str]]:
    """Each key path of a YAML document mapped to its 1-based line, for error messages; and a
    problem for every key given twice in one mapping (YAML would keep the last value silently)."""
    index: dict[tuple, int] = {}
    twice: list[str] = []
    seen: set[int] = set()  # an alias names a node already walked (`x: &a [*a]` would recurse forever)

    def walk(node, path):
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                sub = path + (key_node.value,)
                if sub in index:
                    twice.append(f"`{_dotted(sub)}` is given twice (lines {index[sub]} and {key_node.start_mark.line + 1}); keep one")
                index[sub] = key_node.start_mark.line + 1
                walk(value_node, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                index[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), ())
    except yaml.YAMLError:
        pass
    return index, twice


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's union-tag element (`method.lora.r` -> `method.r`)."""
    if len(loc) >= 2 and loc[0] == "method" and loc[1] in METHOD_TYPES:
        return (loc[0],) + loc[2:]
    return loc


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _allowed_keys(raw_loc: tuple) -> list[str]:
    """Keys allowed at the parent of `raw_loc` (pydantic's loc, union tag included)."""
    model: Any = Recipe
    parts = list(raw_loc[:-1])
    while parts:
        part = parts.pop(0)
        if isinstance(part, int):
            continue
        if part == "method" and parts and parts[0] in METHOD_TYPES:
            model = METHOD_TYPES[parts.pop(0)]
            continue
        field = model.model_fields.get(part)
        model = section_type(field.annotation) if field is not None else None
        if model is None:
            return []
    return list(model.model_fields)


def _describe(err: dict, lines: dict[tuple, int], overrides: set[tuple]) -> str:
    loc = _clean_loc(tuple(err["loc"]))
    kind = err["type"]
    if not loc:  # a check across sections names its key first (`data.max_length 256 is longer ...`): file it there
        named = re.match(r"([a-z_]+(?:\.[a-z_]+)+)\b", err["msg"].removeprefix("Value error, "))
        if named:
            loc = tuple(named.group(1).split("."))
    if kind == "union_tag_invalid":
        loc += ("kind",)
    key = _dotted(loc) or "(top level)"
    where = ""
    for n in range(len(loc), -1, -1):
        if loc[:n] in overrides:
            where = " (from --set)"
            break
        if loc[:n] in lines:
            where = f" (line {lines[loc[:n]]})"
            break
    if kind == "extra_forbidden":
        other_method = _other_method_hint(tuple(err["loc"]), overrides)
        if other_method:
            return f"`{key}`{where}: {other_method}"
        allowed = _allowed_keys(tuple(err["loc"]))
        guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean `{guess[0]}`?" if guess else f"allowed keys: {', '.join(allowed)}"
        return f"`{key}`{where}: unknown key; {hint}"
    if kind == "missing":
        return f"`{key}`{where}: required but missing"
    if kind == "union_tag_invalid":
        return f"`{key}`{where}: got {err['input'].get('kind')!r}; expected one of 'full', 'lora', 'qlora', 'prompt_tuning'"
    if kind == "union_tag_not_found":
        return f"`{key}`{where}: needs `kind: full`, `kind: lora`, `kind: qlora` or `kind: prompt_tuning`"
    msg = err["msg"].removeprefix("Value error, ")
    if kind.startswith(("value_error", "assertion_error")):
        return f"`{key}`{where}: {msg}{_synthetic_keys_hint(msg, loc)}"
    return f"`{key}`{where}: {msg}; got {err['input']!r}"


def _other_method_hint(raw_loc: tuple, overrides: set[tuple]) -> str:
    """For a method key that belongs to other kinds (`r` under `kind: full`, as after `--set
    method.kind=full` on a LoRA recipe): whose setting it is and how to drop it; else ''."""
    if len(raw_loc) != 3 or raw_loc[0] != "method" or raw_loc[1] not in METHOD_TYPES:
        return ""
    kind, name = raw_loc[1], raw_loc[2]
    owners = [k for k, model in METHOD_TYPES.items() if name in model.model_fields]
    if not owners:
        return ""
    whose = " and ".join(owners)
    if ("method", "kind") in overrides:  # switched on the command line: give the section whole there
        fix = f"give the whole section instead, e.g. --set 'method={{kind: {kind}}}'"
    else:
        fix = "remove it"
    return f"a setting of method.kind {whose}, not of {kind}; {fix}"


def _synthetic_keys_hint(msg: str, loc: tuple) -> str:
    """A source switched from `synthetic` on the command line keeps the recipe's `count`/`tasks`:
    say how to drop them there."""
    keys = [k for k in ("count", "tasks") if f"`{k}` only applies to format synthetic" in msg]
    if not keys:
        return ""
    path = ".".join(str(part) for part in loc)
    drops = " ".join(f"--set {path}.{k}=null" for k in keys)
    return f" (the recipe sets it: on the command line add {drops}, or give the whole list with --set 'data.sources=[...]')"


def parse_override(text: str) -> tuple[tuple, Any]:
    """`train.lr=1e-4` -> (('train', 'lr'), 0.0001). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise RecipeError([f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4"])
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not all(p.strip() for p in parts):
        raise RecipeError([f"--set {text!r}: the key has an empty part; write dotted keys like train.lr or data.sources.0.path"])
    path = tuple(int(p) if p.isdigit() else p for p in parts)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise RecipeError([f"--set {text!r}: value is not valid YAML ({e.problem})"])
    return path, value


def _apply_override(raw: dict, path: tuple, value: Any) -> None:
    node: Any = raw
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(node, dict):
            node = node.setdefault(part, [] if isinstance(nxt, int) else {})
        elif _list_index(node, part, path, i):
            if part == len(node):  # one past the end adds an entry: data.sources.1.format=text
                node.append([] if isinstance(nxt, int) else {})
            node = node[part]
        else:
            raise RecipeError([f"--set {_dotted(path)}: `{_dotted(path[: i + 1])}` is not a section that can be indexed"])
    last = path[-1]
    if _list_index(node, last, path, len(path) - 1):
        node[last:last + 1] = [value]
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise RecipeError([f"--set {_dotted(path)}: cannot set this key"])


def _list_index(node: Any, part: Any, path: tuple, i: int) -> bool:
    """Whether `part` indexes the list `node` (0 to its length, which adds an entry); an index further
    out is an error giving the length."""
    if not (isinstance(node, list) and isinstance(part, int)):
        return False
    if part > len(node):
        n = len(node)
        raise RecipeError([f"--set {_dotted(path)}: `{_dotted(path[:i])}` has {n} entr{'y' if n == 1 else 'ies'}, so "
                           f"index {part} is past its end; use 0 to {n} ({n} adds one)"])  # fmt: skip
    return True


def load_recipe(path: str | Path, overrides: list[str] = (), check_paths: bool = False) -> Recipe:
    """Read, override and validate a recipe file. Raises RecipeError listing every problem.
    `check_paths`: also refuse data paths that are plainly local and do not exist (what `run`,
    `validate` and `data` ask; a run's frozen recipe is read without it, so eval and export work
    after the data has moved)."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError([f"{path} is a folder; give a recipe file (YAML), or a shipped recipe's name (`gptj-tune recipes`)"])
    if not path.is_file():
        raise RecipeError([f"file not found: {path}; list shipped recipes with `gptj-tune recipes`"])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError([f"not UTF-8 text (byte {e.start}): a recipe is a YAML file"], source=str(path)) from None
    try:
        raw = yaml.safe_load(text)
        lines, twice = _key_lines(text)
    except RecursionError:
        raise RecipeError(["nested too deeply to be a recipe (thousands of levels of [ or {); a recipe is a few "
                           "levels of sections and keys"], source=str(path)) from None  # fmt: skip
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        raise RecipeError([f"{line}not valid YAML: {getattr(e, 'problem', e)}"], source=str(path))
    if raw is None:
        raise RecipeError(["the file is empty: write the sections to change (`{}` for every default), or start from "
                           "a shipped recipe: gptj-tune recipes copy quickstart my.yaml"], source=str(path))  # fmt: skip
    if twice:
        raise RecipeError(twice, source=str(path))
    if not isinstance(raw, dict):
        raise RecipeError([f"the top level must be a mapping of sections, got {type(raw).__name__}"], source=str(path))
    parsed = [parse_override(o) for o in overrides]
    for key_path, value in parsed:
        _apply_override(raw, key_path, value)
    output = raw.setdefault("output", {})
    if isinstance(output, dict):
        output.setdefault("dir", f"runs/{path.stem}")
    _resolve_source_paths(raw, path.parent)
    missing = _missing_data_paths(raw, lines, {p for p, _ in parsed}) if check_paths else []
    return validate_recipe(raw, source=str(path), lines=lines, overrides={p for p, _ in parsed}, more_problems=missing)


_DATA_SUFFIXES = (".json", ".jsonl", ".txt", ".csv", ".parquet", ".arrow", ".gz", ".bz2", ".xz", ".zst")


def looks_local(path: str) -> bool:
    """Whether a data path can only mean local files: absolute, `./`, `../` or `~`, a data file
    suffix, a glob pattern, or more slashes than a hub id (`owner/name`) has. `novels` or `tatsu-lab/alpaca`
    could be either, and are left to the run, which tries the hub after the disk."""
    return (Path(path).is_absolute() or path.startswith(("./", "../", "~", ".\\")) or path.lower().endswith(_DATA_SUFFIXES)
            or path.count("/") > 1 or "\\" in path or glob.has_magic(path))  # fmt: skip


def _missing_data_paths(raw: dict, lines: dict, overrides: set) -> list[str]:
    """Local data paths (as `looks_local` tells them) that do not exist, read from the raw recipe so
    that they are reported with its other problems."""
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    sources = data.get("sources") if isinstance(data.get("sources"), list) else []
    problems = []
    for i, source in enumerate(sources):
        path = source.get("path") if isinstance(source, dict) else None
        if not isinstance(path, str) or not path or not looks_local(path):
            continue
        loc = ("data", "sources", i, "path")
        where = " (from --set)" if loc in overrides else f" (line {lines[loc]})" if loc in lines else ""
        if is_pattern(path):
            if not matches(path):
                problems.append(f"`data.sources.{i}.path`{where}: the pattern {path[:300]} matches no files (a relative "
                                f"pattern is looked for beside the recipe file, then in the current directory)")  # fmt: skip
            continue
        if _exists(Path(path).expanduser()):
            continue
        problems.append(f"`data.sources.{i}.path`{where}: {path[:300]} does not exist (a relative path is looked for "
                        f"beside the recipe file, then in the current directory); fix the path, or copy the data there")  # fmt: skip
    return problems


def is_pattern(path: str) -> bool:
    """Whether a data path is a glob pattern (`data/train-*.parquet`, `books/**/*.txt`) rather than
    a file or folder of that name."""
    return glob.has_magic(path) and not _exists(Path(path).expanduser())


def matches(pattern: str) -> list[Path]:
    """The files a glob pattern matches (`**` crosses folders), sorted; none for one the system
    cannot look up."""
    try:
        return sorted(p for p in map(Path, glob.glob(str(Path(pattern).expanduser()), recursive=True)) if p.is_file())
    except (OSError, ValueError):
        return []


def _exists(path: Path) -> bool:
    """Path.exists that says False for a name the system cannot even look up (too long, a NUL byte)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def _resolve_source_paths(raw: dict, base: Path) -> None:
    """Relative local paths (data, DeepSpeed JSON) are relative to the recipe file, like an import in code."""
    sources = raw.get("data", {}).get("sources") if isinstance(raw.get("data"), dict) else None
    for source in sources if isinstance(sources, list) else []:
        if isinstance(source, dict) and isinstance(source.get("path"), str) and is_pattern(source["path"]):
            pattern = str(Path(source["path"]).expanduser())
            if not Path(pattern).is_absolute():  # beside the recipe file, else where the command runs
                beside = str(base.resolve() / pattern)
                source["path"] = beside if matches(beside) or not matches(pattern) else str(Path.cwd() / pattern)
            else:
                source["path"] = pattern
        elif isinstance(source, dict) and isinstance(source.get("path"), str):
            candidate = base / source["path"]
            if not Path(source["path"]).is_absolute() and _exists(candidate):
                source["path"] = str(candidate.resolve())
            elif _exists(Path(source["path"])):  # relative to where the command runs (a --set value)
                source["path"] = str(Path(source["path"]).resolve())
    # A local model or tokenizer folder is relative to where the command runs, as from_pretrained reads
    # it; frozen as an absolute path, so the run's export, eval and generate work from anywhere.
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    for key in ("name_or_path", "tokenizer"):
        value = model.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute() and _is_dir(Path(value)):
            model[key] = str(Path(value).resolve())
    dist = raw.get("distributed") if isinstance(raw.get("distributed"), dict) else {}
    ds = dist.get("deepspeed")
    if isinstance(ds, dict) and isinstance(ds.get("config"), str) and not Path(ds["config"]).is_absolute():
        ds["config"] = str((base / ds["config"]).resolve())
    if isinstance(dist.get("hostfile"), str) and not Path(dist["hostfile"]).is_absolute():
        dist["hostfile"] = str((base / dist["hostfile"]).resolve())
    ev = raw.get("eval") if isinstance(raw.get("eval"), dict) else {}
    if isinstance(ev.get("data_dir"), str) and not Path(ev["data_dir"]).is_absolute():
        ev["data_dir"] = str((base / ev["data_dir"]).resolve())


def validate_recipe(raw: dict, source: str | None = None, lines=None, overrides=frozenset(),
                    more_problems: list[str] = ()) -> Recipe:  # fmt: skip
    """The Recipe, or a RecipeError listing every problem in one pass: wrong keys and values, and the
    checks across sections, which pydantic runs only once every field is valid (so the keys found
    wrong are set aside and the rest validated again to find them), and `more_problems`."""
    problems, current = list(more_problems), copy.deepcopy(raw)
    for _ in range(4):
        try:
            recipe = Recipe.model_validate(current)
            break
        except ValidationError as e:
            # a check across sections reports each of its problems on a line of its own
            each = [{**err, "msg": line} for err in e.errors() for line in str(err["msg"]).split("\n")]
            found = [_describe(err, lines or {}, set(overrides)) for err in each]
            problems += [p for p in found if p not in problems]
            if not any(_set_aside(current, _clean_loc(tuple(err["loc"]))) for err in e.errors()):
                break
    if problems:
        line = lambda p: int(m.group(1)) if (m := re.search(r"\(line (\d+)\)", p)) else 1 << 30  # noqa: E731
        raise RecipeError(sorted(problems, key=line), source=source)  # in the file's order
    return recipe


def _set_aside(raw: Any, loc: tuple) -> bool:
    """Remove the key at `loc` (its default then applies); whether there was one to remove."""
    node = raw
    for part in loc[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return False
    if isinstance(node, dict) and loc and loc[-1] in node and loc[-1] != "kind":
        del node[loc[-1]]
        return True
    return False
