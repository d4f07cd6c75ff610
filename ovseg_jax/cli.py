"""One command-line style for every entry point: absl flags, `--eval.KEY=VALUE`, one-line errors.

Every tool declares its flags on its own `absl.flags.FlagValues()` (never the global `FLAGS`), so tests can
import several tools into one process and call `tool.main(['--flag', 'value', ...])`, which returns the exit
code. The trainer is the one exception: it keeps the global `FLAGS` with ml_collections' `--config` file flag.

    fv = flags.FlagValues()
    flags.DEFINE_string('checkpoint', None, 'inference checkpoint folder', flag_values=fv)
    args = cli.parse(fv, argv, prog='python -m ovseg_jax.segment', doc=__doc__, required=('checkpoint',),
                     eval_settings=True)
    args.checkpoint, args.eval   # flag values; {eval key: value} of the --eval.KEY=VALUE the user gave

`parse` prints the tool's docstring and flags for `--help` / `-h` (exit 0), and turns a bad flag, a missing
required flag, a bad enum value or an unknown `--eval.KEY` into one line `error: ...` on stderr (exit 2).
absl reads both `--name value` and `--name=value`; booleans are `--name` / `--noname`; repeatable flags are
given once per value. `entry_point` makes `main(argv)` return that exit code instead of raising SystemExit.
Deprecated spellings are rewritten by `rewrite_deprecated`, with one line on stderr, until `REMOVED_IN`.
"""

import functools
import re
import sys
import types
from typing import Callable, Iterable, Mapping, NoReturn, Sequence

from absl import flags

from ovseg_jax import eval_config

HELP_FLAGS = ('--help', '-h', '--helpshort', '--helpfull')
REMOVED_IN = '0.2.0'  # the release in which the spellings that `rewrite_deprecated` accepts stop working


class Exit(SystemExit):
  """Raised by `parse` / `error` after printing help (code 0) or a one-line usage error (code 2)."""


def error(message: str) -> NoReturn:
  """Prints `error: message` on stderr and exits with code 2 (a usage error, as argparse's)."""
  print(f'error: {message}', file=sys.stderr)
  raise Exit(2)


def entry_point(main: Callable[..., int]) -> Callable[..., int]:
  """Decorator for `main(argv=None) -> int`: `--help` returns 0 and a usage error returns 2, not raises."""

  @functools.wraps(main)
  def wrapped(argv: Sequence[str] | None = None) -> int:
    try:
      return main(argv)
    except Exit as e:
      return e.code

  return wrapped


def argv_or_sys(argv: Sequence[str] | None) -> list[str]:
  """The arguments after the program name: `argv` as given, or sys.argv[1:] when None."""
  return list(sys.argv[1:] if argv is None else argv)


def _head(argv: Sequence[str]) -> list[str]:
  """The arguments before a bare `--` (absl parses nothing after it)."""
  return list(argv[:argv.index('--')]) if '--' in argv else list(argv)


# ------------------------------------------------------------------------------------------------------------
# Deprecated spellings.
# ------------------------------------------------------------------------------------------------------------

def rewrite_deprecated(argv: Sequence[str], renames: Mapping[str, str]) -> list[str]:
  """Rewrites old flags into their new spelling, with one deprecation line on stderr per old flag used.

  `renames` maps an old flag to its new one. A new flag ending in `.` takes `KEY=VALUE` and becomes a dotted
  override: {'--set': '--eval.'} turns `--set short_side=448` into `--eval.short_side=448`. Any other new
  flag takes the value as is: {'--templates': '--eval.templates'} turns `--templates X` into
  `--eval.templates=X`. Both `--old value` and `--old=value` are read.
  """
  head, tail = _head(argv), list(argv[len(_head(argv)):])
  out, warned, i = [], set(), 0
  while i < len(head):
    name, eq, value = head[i].partition('=')
    if name not in renames:
      out.append(head[i])
      i += 1
      continue
    if not eq:
      if i + 1 >= len(head):
        error(f'{name} needs a value')
      value, i = head[i + 1], i + 1
    i += 1
    new = renames[name]
    if new.endswith('.'):
      key, sep, val = value.partition('=')
      if not sep or not key.strip():
        error(f'{name} {value!r} must look like KEY=VALUE (better: {new}KEY=VALUE)')
      out.append(f'{new}{key.strip()}={val.strip()}')
      shape = f'{name} KEY=VALUE', f'{new}KEY=VALUE'
    else:
      out.append(f'{new}={value}')
      shape = f'{name} VALUE', f'{new}=VALUE'
    if name not in warned:
      warned.add(name)
      print(f'warning: {shape[0]} is deprecated and will be removed in {REMOVED_IN}; use {shape[1]}',
            file=sys.stderr)
  return out + tail


def pop_overrides(argv: Sequence[str], prefix: str) -> tuple[list[str], list[str]]:
  """Takes `--prefix.KEY=VALUE` / `--prefix.KEY VALUE` out of argv -> (other args, ['KEY=VALUE', ...]).

  For tools whose `--config` is a path string handed on to the trainer (the sweep), where config_flags
  cannot register the overrides itself.
  """
  head, tail = _head(argv), list(argv[len(_head(argv)):])
  rest, found, i = [], [], 0
  dotted = prefix.rstrip('.') + '.'
  while i < len(head):
    arg = head[i]
    if arg.startswith(dotted):
      key, eq, value = arg[len(dotted):].partition('=')
      if not eq:
        if i + 1 >= len(head):
          error(f'{arg} needs a value ({dotted}KEY=VALUE)')
        value, i = head[i + 1], i + 1
      if not key:
        error(f'{arg}: expected {dotted}KEY=VALUE')
      found.append(f'{key}={value}')
    else:
      rest.append(arg)
    i += 1
  return rest + tail, found


# ------------------------------------------------------------------------------------------------------------
# --eval.KEY=VALUE: an ml_collections config-dict flag over the `config.eval` defaults.
# ------------------------------------------------------------------------------------------------------------

def eval_defaults():
  """A fresh ConfigDict of the `config.eval` defaults (the flag mutates the one it is given)."""
  return eval_config.defaults()


def _define_eval(fv: flags.FlagValues, argv: Sequence[str], prog: str) -> None:
  """`--eval.KEY=VALUE` for every key of the eval defaults; an unknown key is one line listing the valid ones.

  config_flags registers one flag per override it finds in `sys_argv` when the flag is defined, typed by the
  default's value, so `--eval.short_side=abc` fails as an int and `--eval.nope=1` never reaches absl.
  """
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  defaults = eval_defaults()
  for arg in _head(argv):
    m = re.match(r'-{1,2}(?:no)?eval\.([^=]*)', arg)
    if m and m.group(1) not in defaults:
      error(f'unknown eval setting --eval.{m.group(1)}; valid keys: {", ".join(sorted(defaults))}')
  try:
    config_flags.DEFINE_config_dict(
        'eval', defaults, 'eval settings: --eval.KEY=VALUE (only the keys given override the checkpoint\'s)',
        flag_values=fv, sys_argv=[prog, *argv])
  except Exception as e:  # pylint: disable=broad-except  (config_flags' own checks, e.g. an unsupported type)
    error(_first_line(e))


# ------------------------------------------------------------------------------------------------------------
# Parsing and help.
# ------------------------------------------------------------------------------------------------------------

def _first_line(e: BaseException) -> str:
  lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
  if not lines:
    return type(e).__name__
  return lines[0] if ' ' in lines[0] else lines[0].strip('"\'')  # KeyError('x') prints as 'x'


def flag_error_message(e: BaseException) -> str:
  """One line for an absl parsing error: 'unknown flag --x', 'flag --n=a: invalid literal for int() ...'."""
  if isinstance(e, flags.UnrecognizedFlagError):
    hint = str(e).split('. Did you mean:', 1)
    return f'unknown flag --{e.flagname}' + (f' (did you mean: {hint[1].strip(" ?")}?)' if len(hint) > 1 else '')
  return _first_line(e)


def _given(fv: flags.FlagValues, name: str) -> bool:
  return bool(fv[name].present)


def parse(fv: flags.FlagValues, argv: Sequence[str] | None, *, prog: str, doc: str,
          required: Iterable[str] = (), one_of: Iterable[Sequence[str]] = (), eval_settings: bool = False,
          positional: int = 0) -> types.SimpleNamespace:
  """Parses `argv` (without the program name; None: sys.argv[1:]) into a namespace of the flags' values.

  Args:
    fv: the tool's own FlagValues, with its flags defined.
    prog: the command shown in help and errors, e.g. 'python -m ovseg_jax.evaluate'.
    doc: the tool's docstring, printed by --help above the flags.
    required: flags that must have a value.
    one_of: groups of flags of which exactly one must be given (e.g. ('checkpoint', 'predictions')).
    eval_settings: also define `--eval.KEY=VALUE` over the eval defaults; `namespace.eval` is then the
      {key: typed value} of the overrides given (only those: the rest keep the checkpoint's saved values).
    positional: how many non-flag arguments are allowed (`namespace.positional`).
  Raises:
    Exit: code 0 after printing help; code 2 after printing a one-line error.
  """
  argv = argv_or_sys(argv)
  if any(a in HELP_FLAGS for a in _head(argv)):
    if eval_settings:
      _define_eval(fv, [], prog)
    print(help_text(fv, prog, doc))
    raise Exit(0)
  if eval_settings:
    _define_eval(fv, argv, prog)
  try:
    rest = fv([prog, *argv])[1:]
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    error(flag_error_message(e))
  if len(rest) > positional:
    error(f'unexpected argument {rest[positional]!r} ({prog} --help lists the flags)')
  for group in one_of:
    given = [n for n in group if _given(fv, n)]
    if len(given) != 1:
      names = ' or '.join(f'--{n}' for n in group)
      error(f'give one of {names}' if not given else f'give only one of {names}, not both')
  for name in required:
    if fv[name].value is None or fv[name].value == []:
      error(f'--{name} is required ({prog} --help lists the flags)')
  values = {n: fv[n].value for n in fv if '.' not in n and n != 'eval'}
  if eval_settings:
    values['eval'] = dict(fv['eval'].override_values)
  return types.SimpleNamespace(**values, positional=rest)


def _flag_usage(flag) -> str:
  if flag.boolean:
    return f'--[no]{flag.name}'
  enum_values = getattr(flag.parser, 'enum_values', None)
  if enum_values:
    return f'--{flag.name}={"|".join(enum_values)}'
  return f'--{flag.name}=' + {'int': 'INT', 'float': 'FLOAT'}.get(flag.flag_type(), 'VALUE')


def help_text(fv: flags.FlagValues, prog: str, doc: str, names: Iterable[str] | None = None) -> str:
  """The tool's docstring, then each flag (in definition order) with its help and default."""
  lines = [f'usage: {prog} [flags]', '', (doc or '').strip(), '', 'flags:']
  for name in (names if names is not None else [n for n in fv if '.' not in n]):
    flag = fv[name]
    if name == 'eval':
      defaults = ', '.join(f'{k}={v}' for k, v in sorted(flag.value.items()))
      lines += ['  --eval.KEY=VALUE', f'      an eval setting, e.g. --eval.short_side=448 (repeat for more keys; '
                'only the keys given override the checkpoint\'s saved ones)', f'      keys and defaults: {defaults}']
      continue
    text = ' '.join(flag.help.split())  # absl appends '; repeat this option ...' to repeatable flags
    if flag.default not in (None, [], False, ''):
      text += f' (default: {flag.default})'
    lines += [f'  {_flag_usage(flag)}', f'      {text}']
  return '\n'.join(lines)
