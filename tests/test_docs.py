"""What the documentation names exists: config fields, ``jaxvars.*`` names, repository files, links.

Checked in README.md, docs/*.md and results/*.md (whichever exist; README.md must):

* every ``--config.FIELD`` / ``--config.FIELD=...`` (anywhere, code blocks included) and every
  ``config.FIELD`` inside backticks or a fenced code block names a field (or a section) of a
  config the project builds: configs/joint.py's ``get_config`` over every valid combination of
  its presets, configs/pretrain.py's, and every ``get_config`` of benchmarks/ (placeholders
  such as ``--config.FIELD=VALUE`` or ``config.stages.<name>.epochs`` pass, and so do the
  fields a page's own code blocks add, as a tutorial does: ``sy.median_size = 3``);
* every dotted ``jaxvars.a.b[.c]`` is a module, or a module's attribute (modules that define
  absl flags are read, not imported: two of them define ``--out``);
* every repository path (``jaxvars/...``, ``configs/...``, ``benchmarks/...``, ``launch/...``,
  ``tests/...``, ``docs/...``, ``results/...``) exists;
* every relative markdown link points to an existing file inside the repository.

The comments and docstrings of jaxvars/ and configs/ get the field, name and path checks too.
No jax program is compiled: the test reads text and builds configs.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import io
import itertools
import pathlib
import re
import sys
import tokenize

import ml_collections
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOC_DIRS = ("docs", "results")
CODE_DIRS = ("jaxvars", "configs")
# Top-level directories whose paths a text may name.
REPO_DIRS = ("jaxvars", "configs", "benchmarks", "launch", "tests", "docs", "results")
# Field names that stand for any field (``--config.FIELD=VALUE``, ``config.x``).
PLACEHOLDERS = frozenset({"FIELD", "FIELDS", "SECTION", "X", "Y", "PATH", "NAME", "KEY", "VALUE",
                          "field", "fields", "section", "path", "name", "key", "x", "y", "foo",
                          "bar"})
# ``config.json`` and the like are file names, not fields.
FILE_SUFFIXES = frozenset({"py", "json", "yaml", "yml", "md", "txt", "toml", "cfg", "ini", "sh"})

_SEGMENT = r"(?:[A-Za-z_]\w*|<[^<>`\n]*>|\*)"
_FIELD = rf"{_SEGMENT}(?:\.{_SEGMENT})*"
FLAG_RE = re.compile(rf"--config\.({_FIELD})")
CONFIG_RE = re.compile(rf"(?<![\w.\-/])config\.({_FIELD})(\()?")
DOTTED_RE = re.compile(r"(?<![\w./\-])(jaxvars(?:\.[A-Za-z_]\w*)+)")
PATH_RE = re.compile(rf"(?<![\w./\-<>])((?:{'|'.join(REPO_DIRS)})/[\w./\-<>*{{}}]*)")
# A path written by the command it appears in (``--out=results/x.md``) need not exist yet.
OUTPUT_BEFORE_RE = re.compile(r"(?:--(?:out|output|json)=|>\s*)$")
LINK_RE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
LINK_DEF_RE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
INLINE_CODE_RE = re.compile(r"(`+)(.+?)\1")


# ---- The fields of every config the project builds ------------------------------------------

def _load(path: pathlib.Path, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def preset_tokens(module) -> tuple[list[str], list[str], list[str]]:
  """(sizes, datasets, flags) of configs/joint.py: the size and dataset tuples, and the other
  preset words ``_parse_presets`` accepts (read off its ``token == '...'`` comparisons)."""
  source = pathlib.Path(module.__file__).read_text()
  flags = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.FunctionDef) and node.name == "_parse_presets":
      for sub in ast.walk(node):
        if isinstance(sub, ast.Compare) and isinstance(sub.left, ast.Name) and \
            sub.left.id == "token" and isinstance(sub.ops[0], ast.Eq) and \
            isinstance(sub.comparators[0], ast.Constant):
          flags.append(sub.comparators[0].value)
  return list(module.SIZES), list(module.DATASETS), flags


def preset_args(module) -> list[str]:
  """Every valid preset argument of configs/joint.py (at most one size, one dataset, any
  subset of the other words), '' included."""
  sizes, datasets, flags = preset_tokens(module)
  args = []
  for size, dataset in itertools.product([None] + sizes, [None] + datasets):
    for r in range(len(flags) + 1):
      for extra in itertools.combinations(flags, r):
        arg = ",".join(t for t in (size, dataset, *extra) if t)
        try:
          module.get_config(arg)
        except ValueError:  # E.g. 'vbpr' and 'full' together.
          continue
        args.append(arg)
  return args


def _walk(config, prefix: str, children: dict[str, set[str]]) -> None:
  children.setdefault(prefix, set())
  for key in config.keys():
    path = f"{prefix}.{key}" if prefix else key
    children[prefix].add(key)
    value = config[key]
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      _walk(value, path, children)
    else:
      children.setdefault(path, None)


@functools.cache
def config_tree() -> dict[str, set[str] | None]:
  """{field path: its child names (a section) or None (a leaf)} over every config the project
  builds; '' is the root."""
  joint = _load(REPO / "configs" / "joint.py", "_docs_configs_joint")
  pretrain = _load(REPO / "configs" / "pretrain.py", "_docs_configs_pretrain")
  configs = []
  for arg in preset_args(joint):
    configs.append(joint.get_config(arg))
    configs.append(pretrain.get_config(arg))
  if str(REPO) not in sys.path:  # Benchmark configs import `configs.joint`.
    sys.path.insert(0, str(REPO))
  for path in sorted((REPO / "benchmarks").glob("*.py")):
    if re.search(r"^def get_config\(", path.read_text(), re.M):
      configs.append(_load(path, f"_docs_benchmarks_{path.stem}").get_config(""))
  tree: dict[str, set[str] | None] = {}
  for config in configs:
    children: dict[str, set[str] | None] = {}
    _walk(config, "", children)
    for path, kids in children.items():
      if kids is None:
        tree.setdefault(path, None)
      else:
        tree[path] = (tree.get(path) or set()) | kids
  return tree


@functools.cache
def config_aliases() -> dict[str, str]:
  """{local name: section path} of configs/joint.py's ``get_config`` (``c`` -> '',
  ``sy`` -> 'systems', ``ad`` -> 'attack.adaptive', ...), read off its
  ``parent.section = alias = ...`` assignments."""
  tree = ast.parse((REPO / "configs" / "joint.py").read_text())
  aliases = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.FunctionDef) and node.name == "get_config":
      for sub in ast.walk(node):
        if not isinstance(sub, ast.Assign):
          continue
        names = [t.id for t in sub.targets if isinstance(t, ast.Name)]
        attrs = [t for t in sub.targets if isinstance(t, ast.Attribute) and
                 isinstance(t.value, ast.Name) and t.value.id in aliases]
        if names and attrs:
          parent = aliases[attrs[0].value.id]
          aliases[names[0]] = f"{parent}.{attrs[0].attr}" if parent else attrs[0].attr
        elif names and isinstance(sub.value, ast.Call) and not aliases:
          aliases[names[0]] = ""  # c = ml_collections.ConfigDict()
  return aliases


_DEFINES_RE = re.compile(r"^\s*([A-Za-z_]\w*)((?:\.[A-Za-z_]\w*)+)\s*=(?!=)")


def defined_fields(text: str) -> set[str]:
  """Fields a page adds to the config in its code blocks, as a tutorial does
  (``sy.median_size = 3`` in configs/joint.py's style, or ``config.systems.median_size = 3``):
  references to them on that page are not errors."""
  aliases = dict(config_aliases(), config="")
  fields, fence = set(), None
  for line in text.splitlines():
    opener = re.match(r"(`{3,}|~{3,})", line.lstrip())
    if opener and (fence is None or line.lstrip().startswith(fence)):
      fence = opener.group(1) if fence is None else None
      continue
    m = _DEFINES_RE.match(line) if fence is not None else None
    if m and m.group(1) in aliases:
      parent, rest = aliases[m.group(1)], m.group(2)[1:]
      fields.add(f"{parent}.{rest}" if parent else rest)
  return fields


def _is_wildcard(segment: str) -> bool:
  """``<name>``, ``*`` or an upper-case placeholder (lower-case ones such as ``name`` are also
  real fields below the top level: ``config.data.name``)."""
  return segment.startswith("<") or segment == "*" or \
      (segment in PLACEHOLDERS and segment.isupper())


def field_problem(field: str, added: frozenset[str] = frozenset()) -> str | None:
  """Why ``field`` (a dotted path, maybe with ``<placeholder>`` segments) is not a config
  field, or None when it is one, is in ``added`` (a page's own new fields) or is a
  placeholder."""
  segments = field.split(".")
  if segments[0] in PLACEHOLDERS or _is_wildcard(segments[0]) or field in added:
    return None
  tree = config_tree()
  paths = {""}
  for i, segment in enumerate(segments):
    if _is_wildcard(segment):
      # A placeholder for any child (or a new one, as the last segment) of a section.
      sections = {p for p in paths if tree.get(p) is not None}
      if not sections:
        return f"config.{'.'.join(segments[:i])} has no fields"
      if i == len(segments) - 1:
        return None
      paths = {f"{p}.{k}" if p else k for p in sections for k in tree[p]}
      continue
    paths = {p2 for p in paths if tree.get(p) is not None and segment in tree[p]
             for p2 in [f"{p}.{segment}" if p else segment]}
    if not paths:
      where = ".".join(segments[:i])
      return (f"no config field {field!r} ({segment!r} is not a field of "
              f"{'config.' + where if where else 'the config'})")
  return None


# ---- jaxvars names and repository paths --------------------------------------------------

def _defines_flags(path: pathlib.Path) -> bool:
  return bool(re.search(r"^\w+\s*=\s*(?:\w+\.)?flags\.DEFINE|^(?:\w+\.)?flags\.DEFINE|"
                        r"^\w+\s*=\s*config_flags\.DEFINE", path.read_text(), re.M))


def _static_names(body) -> dict[str, object]:
  """{name: its class body or None} of the names bound at the top of ``body``."""
  names: dict[str, object] = {}
  for node in body:
    if isinstance(node, ast.ClassDef):
      names[node.name] = node.body
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      names[node.name] = None
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      for alias in node.names:
        names[(alias.asname or alias.name).split(".")[0]] = None
    elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      for target in targets:
        for sub in ast.walk(target):
          if isinstance(sub, ast.Name):
            names[sub.id] = None
  return names


@functools.cache
def dotted_problem(name: str) -> str | None:
  """Why ``name`` ('jaxvars.a.b.c') is neither a module nor a module's attribute, or None."""
  parts = name.split(".")
  module, spec, n = parts[0], importlib.util.find_spec(parts[0]), 1
  while n < len(parts) and spec.submodule_search_locations is not None:
    try:
      sub = importlib.util.find_spec(f"{module}.{parts[n]}")
    except ImportError as e:
      return f"{name}: importing {module} fails ({e})"
    if sub is None:
      break
    module, spec, n = f"{module}.{parts[n]}", sub, n + 1
  rest = parts[n:]
  if not rest:
    return None
  origin = pathlib.Path(spec.origin) if spec.origin else None
  if origin is not None and origin.suffix == ".py" and _defines_flags(origin):
    # Importing it would define its absl flags in this process (several modules define
    # --out): read its top-level names instead.
    body = ast.parse(origin.read_text()).body
    for i, part in enumerate(rest):
      names = _static_names(body)
      if part not in names:
        return f"{name}: {module}{''.join('.' + p for p in rest[:i])} has no {part!r}"
      body = names[part]
      if body is None:
        return None  # A function, constant or import: deeper names are not checked.
    return None
  try:
    obj = importlib.import_module(module)
  except Exception as e:  # noqa: BLE001 - reported as a bad reference.
    return f"{name}: importing {module} fails ({type(e).__name__}: {e})"
  for i, part in enumerate(rest):
    if not hasattr(obj, part):
      return f"{name}: {module}{''.join('.' + p for p in rest[:i])} has no {part!r}"
    obj = getattr(obj, part)
  return None


def path_problem(path: str) -> str | None:
  """Why the repository path ``path`` is not there, or None (also for a placeholder or glob:
  ``jaxvars/recommenders/<name>.py``, ``benchmarks/*.py``)."""
  if any(c in path for c in "<>*{}"):
    return None
  path = path.rstrip(".-")
  if not (REPO / path).exists():
    return f"no such file or directory in the repository: {path}"
  return None


# ---- Extraction --------------------------------------------------------------------------

def _fields_in(text: str, code: bool) -> list[str]:
  """Config fields ``text`` names: every ``--config.X``, and in code every ``config.X``."""
  fields = [m.group(1) for m in FLAG_RE.finditer(text)]
  if code:
    for m in CONFIG_RE.finditer(text):
      field, call = m.group(1), m.group(2)
      if call and "." not in field:  # A ConfigDict method: config.lock().
        continue
      if call:  # config.a.b.get(...): the part before the method.
        field = field.rsplit(".", 1)[0]
      if field in FILE_SUFFIXES:
        continue
      fields.append(field)
  return fields


def _paths_in(text: str) -> list[str]:
  out = []
  for m in PATH_RE.finditer(text):
    if OUTPUT_BEFORE_RE.search(text[:m.start()]):
      continue
    out.append(m.group(1))
  return out


def _line_problems(text: str, code: bool, added: frozenset[str] = frozenset()) -> list[str]:
  """The bad references of one line of text (``code``: inside backticks or a code block;
  ``added``: fields the page itself adds to the config)."""
  problems = []
  for field in _fields_in(text, code):
    problem = field_problem(field, added)
    if problem:
      problems.append(problem)
  for name in DOTTED_RE.findall(text):
    problem = dotted_problem(name)
    if problem:
      problems.append(problem)
  for path in _paths_in(text):
    problem = path_problem(path)
    if problem:
      problems.append(problem)
  return list(dict.fromkeys(problems))


def _repo_relative(md: pathlib.Path, target: str) -> str | None:
  """The repository path a link target of ``md`` points to (None: a URL or outside)."""
  target = target.split("#", 1)[0].split("?", 1)[0]
  if not target or re.match(r"^[a-zA-Z][a-zA-Z0-9+.\-]*:", target):
    return None
  resolved = (REPO / target.lstrip("/")) if target.startswith("/") else md.parent / target
  try:
    return str(resolved.resolve().relative_to(REPO))
  except ValueError:
    return None


def _link_problem(md: pathlib.Path, target: str) -> str | None:
  if re.match(r"^[a-zA-Z][a-zA-Z0-9+.\-]*:", target) or target.startswith(("#", "//")):
    return None  # URL, mailto:, an anchor of this page.
  target = target.split("#", 1)[0].split("?", 1)[0]
  if not target:
    return None
  resolved = (md.parent / target).resolve() if not target.startswith("/") else \
      (REPO / target.lstrip("/")).resolve()
  try:
    resolved.relative_to(REPO)
  except ValueError:
    return f"link {target!r} points outside the repository"
  if not resolved.exists():
    return f"link {target!r}: no such file ({resolved.relative_to(REPO)})"
  return None


def markdown_problems(md: pathlib.Path, text: str | None = None) -> list[str]:
  """'file:line: problem' for every bad reference of a markdown file."""
  text = md.read_text() if text is None else text
  rel = md.relative_to(REPO) if md.is_relative_to(REPO) else md
  problems = []
  added = frozenset(defined_fields(text))
  fence = None
  for lineno, line in enumerate(text.splitlines(), 1):
    stripped = line.lstrip()
    opener = re.match(r"(`{3,}|~{3,})", stripped)
    if fence is None and opener:
      fence = opener.group(1)
      continue
    if fence is not None:
      if stripped.startswith(fence):
        fence = None
      else:
        problems += [f"{rel}:{lineno}: {p}" for p in _line_problems(line, True, added)]
      continue
    found = []
    targets = [m.group(1) for m in LINK_RE.finditer(line)]
    m = LINK_DEF_RE.match(line)
    if m:
      targets.append(m.group(1))
      line = ""
    for target in targets:
      problem = _link_problem(md, target)
      if problem:
        found.append(problem)
    # Link targets are checked above, as links (relative to this file); a link text that
    # repeats its target (``[docs/x.md](docs/x.md)``) is not reported twice.
    line = re.sub(r"\]\([^)]*\)", "] ", line)
    linked = {_repo_relative(md, t) for t in targets}
    seen = lambda p: p.startswith("no such file") and p.split(": ", 1)[1] in linked  # noqa: E731
    found += [p for p in _line_problems(INLINE_CODE_RE.sub(" ", line), False, added)
              if not seen(p)]
    for m in INLINE_CODE_RE.finditer(line):
      found += [p for p in _line_problems(m.group(2), True, added) if not seen(p)]
    problems += [f"{rel}:{lineno}: {p}" for p in dict.fromkeys(found)]
  return problems


def _comment_lines(path: pathlib.Path):
  """(line, text) of every comment and docstring line of a Python file."""
  source = path.read_text()
  docstrings = {node.value.lineno for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and
                isinstance(node.value.value, str)}
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      yield tok.start[0], tok.string
    elif tok.type == tokenize.STRING and tok.start[0] in docstrings:
      for i, line in enumerate(tok.string.splitlines()):
        yield tok.start[0] + i, line


def code_comment_problems(path: pathlib.Path) -> list[str]:
  rel = path.relative_to(REPO)
  return [f"{rel}:{lineno}: {p}" for lineno, text in _comment_lines(path)
          for p in _line_problems(text, code=True)]


def markdown_files() -> list[pathlib.Path]:
  files = [REPO / "README.md"]
  for d in DOC_DIRS:
    if (REPO / d).is_dir():
      files += sorted((REPO / d).glob("*.md"))
  return files


def _fail(problems: list[str]) -> None:
  if problems:
    pytest.fail(f"{len(problems)} bad reference(s):\n" + "\n".join(problems), pytrace=False)


# ---- Tests -------------------------------------------------------------------------------

def test_readme_exists_and_names_real_things():
  readme = REPO / "README.md"
  assert readme.is_file(), "README.md is missing"
  text = readme.read_text()
  # The scanner sees the README's references (a regex that matched nothing would pass).
  assert FLAG_RE.search(text) or DOTTED_RE.search(text), "README.md names no config flag or module"
  _fail(markdown_problems(readme))


@pytest.mark.parametrize("md", [p for p in markdown_files() if p.name != "README.md" or
                                p.parent != REPO],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_docs_and_results_name_real_things(md):
  _fail(markdown_problems(md))


def test_code_comments_name_real_things():
  problems = []
  for d in CODE_DIRS:
    for path in sorted((REPO / d).rglob("*.py")):
      problems += code_comment_problems(path)
  _fail(problems)


def test_presets_enumerated():
  joint = _load(REPO / "configs" / "joint.py", "_docs_configs_joint_presets")
  sizes, datasets, flags = preset_tokens(joint)
  assert {"cpu", "tiny"} <= set(sizes) and {"hm", "folder"} <= set(datasets)
  assert {"vbpr", "full"} <= set(flags)
  args = preset_args(joint)
  assert {"", "cpu", "cpu,hm", "cpu,hm,full", "tiny", "cpu,folder", "vbpr"} <= set(args)
  assert "vbpr,full" not in args  # The two exclude each other.


def test_fields():
  assert field_problem("attack.pgd_steps") is None
  assert field_problem("attack") is None  # A section.
  assert field_problem("attack.adaptive.eot_samples") is None
  assert field_problem("pretrain.epochs") is None  # configs/pretrain.py.
  assert field_problem("ablation.variants.no_detector") is None  # Only with 'full'.
  assert field_problem("stages.<stage>.epochs") is None
  assert field_problem("stages.NAME.epochs") is None
  assert field_problem("data.name") is None
  assert field_problem("ablation.variants.<new name>") is None
  assert field_problem("FIELD") is None
  assert "'vbpr'" in field_problem("vbpr.factors")
  assert "'nope'" in field_problem("attack.nope")
  assert field_problem("stages.<stage>.nope") is not None
  assert field_problem("seed.<x>") is not None  # A leaf has no fields.


def test_extraction_has_no_false_positives():
  line = ("python -m jaxvars.main --config=configs/joint.py:cpu,hm --workdir=/tmp/jaxvars/docs/x "
          "--config.FIELD=VALUE; config.lock(); config.json; --out=results/new.md; "
          "jaxvars/recommenders/<name>.py benchmarks/*.py <workdir>/results/x.md")
  assert _line_problems(line, code=True) == []
  assert _fields_in("--config=configs/joint.py:cpu", code=True) == []
  assert _fields_in("see --config.attack.eps=8.", code=False) == ["attack.eps"]
  assert _fields_in("config.attack.eps in prose", code=False) == []
  assert _fields_in("cfg = my_config.attack; self.config.seed", code=True) == []


def test_a_page_may_add_fields_in_its_code_blocks():
  assert config_aliases()["sy"] == "systems" and config_aliases()["ad"] == "attack.adaptive"
  assert config_aliases()["c"] == ""
  text = ("Add it to `configs/joint.py`:\n```python\n  sy.median_size = 3  # comment\n"
          "  config.attack.adaptive.new_knob = 1\n  if sy.evaluate == 1:\n```\n"
          "then `--config.systems.median_size=5` and `config.attack.adaptive.new_knob`, but "
          "`--config.systems.other=1`\n")
  assert defined_fields(text) == {"systems.median_size", "attack.adaptive.new_knob"}
  problems = markdown_problems(REPO / "docs" / "page.md", text)
  assert len(problems) == 1 and "'other'" in problems[0], problems
  # Another page does not get them.
  assert field_problem("systems.median_size") is not None


def test_bad_references_are_found(tmp_path):
  md = tmp_path / "page.md"
  text = ("ok `config.attack.pgd_steps` and `--config.seed=1`\n"
          "`--config.vbpr.factors=32`\n"
          "```bash\npython -m jaxvars.nope --config.attack.nope=1\n```\n"
          "[a link](missing.md) and `jaxvars.layers.NO_SUCH_NAME` and `benchmarks/nope.py`\n"
          "`config.nope` and `jaxvars.main.NO_FLAG_MODULE_NAME`\n")
  problems = markdown_problems(md, text)
  assert len(problems) == 8, problems
  assert problems[0].startswith(f"{md}:2: ") and "'vbpr'" in problems[0]
  assert any(":4: " in p and "jaxvars.nope" in p for p in problems)
  assert any(":4: " in p and "'nope'" in p for p in problems)
  assert any(":6: " in p and "missing.md" in p for p in problems)
  assert any("NO_SUCH_NAME" in p for p in problems)
  assert any("benchmarks/nope.py" in p for p in problems)
  assert any(":7: " in p and "'nope'" in p for p in problems)
  assert any("NO_FLAG_MODULE_NAME" in p for p in problems)


if __name__ == "__main__":  # A listing without pytest: python tests/test_docs.py [FILES...]
  for arg in sys.argv[1:] or [str(p) for p in markdown_files()]:
    p = pathlib.Path(arg).resolve()
    found = code_comment_problems(p) if p.suffix == ".py" else markdown_problems(p)
    print("\n".join(found) if found else f"{arg}: ok")
