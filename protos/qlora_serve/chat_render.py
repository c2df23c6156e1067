"""Bounded rendering of tenant-supplied chat templates (an adapter's `chat_template.jinja`,
a training job's `chat_template`): the same Jinja dialect transformers renders chat
templates in (sandboxed, `tojson`, `raise_exception`, `namespace`, loop controls), with
limits Jinja's sandbox lacks (it only caps `range()`), so that one template cannot pin a
thread or fill the server's memory:

- time: at most MAX_RENDER_S seconds of Python execution per render (a trace hook checks
  the clock; Jinja has no timeout of its own);
- size: no value the template builds (`*`, `+`, `~`, literals, filter and method results)
  over MAX_VALUE_CHARS characters, refused BEFORE the C code that would build it runs
  (`'x' * 10**9`, `s.replace(a, b)`, `join`, `center(n)`, `%` widths, `**`);
- output: at most MAX_OUTPUT_CHARS characters of text produced in all.

Exceeding one raises TemplateLimit (an InvalidArgument) with a bounded message. The
operator's own base template keeps transformers' normal path. Lives in the root package
so that adapters/ (registration), training/ (submit) and the engine (serving) share it.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import sys
import threading
import time
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qlora_serve.errors import InvalidArgument, clip

MAX_TEMPLATE_BYTES = 1 << 20  # a template file or text; real ones are a few KiB, a larger one is the wrong file
MAX_RENDER_S = 1.0            # wall-clock seconds one render may run; real templates take ~1 ms
MAX_VALUE_CHARS = 1 << 22     # characters (or list items, deep) in one value a template builds (4x a 256k-token prompt)
MAX_OUTPUT_CHARS = 1 << 24    # characters of text one render may produce in all
MAX_INT_BITS = 1 << 16        # bits of an integer `*` or `**` may build
MAX_JSON_INDENT = 16          # tojson(indent=...) beyond this only pads


class TemplateLimit(InvalidArgument):
    """A chat template exceeded the bounds on time, value size or output of a render."""


class _Expired(BaseException):
    """The render's time ran out (raised by the trace hook; reported as TemplateLimit)."""


_state = threading.local()  # the running render's budget (one render per thread at a time)


class _Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.output = 0
        self.lines = 0

    def tick(self) -> None:
        self.lines += 1
        if self.lines & 255 == 0 and time.monotonic() > self.deadline:
            raise _Expired  # Python removes a trace hook that raises: no `except Exception` may swallow it

    def add_output(self, n: int) -> None:
        self.output += n
        if self.output > MAX_OUTPUT_CHARS:
            raise TemplateLimit(f"the chat template produced over {MAX_OUTPUT_CHARS} characters of text")


def _trace(frame, event, arg):  # sys.settrace hook: every line the render executes ticks the clock
    budget = getattr(_state, "budget", None)
    if budget is not None:
        budget.tick()
    return _trace


def _too_big(what: str, size: int) -> TemplateLimit:
    return TemplateLimit(f"the chat template builds {what} of {size} characters or items; the limit is "
                         f"{MAX_VALUE_CHARS}")


def _size(x, limit: int = MAX_VALUE_CHARS, depth: int = 0) -> int:
    """Characters/items in `x`, counted through nested lists and dicts; stops past `limit`."""
    if isinstance(x, (str, bytes)):
        return len(x)
    if isinstance(x, (list, tuple, set, frozenset, dict)) and depth < 32:
        n = len(x)
        for item in (x.items() if isinstance(x, dict) else x):
            if n > limit:
                break
            n += _size(item, limit - n, depth + 1)
        return n
    return 1


def _checked(value, what: str = "a value"):
    size = _size(value)
    if size > MAX_VALUE_CHARS:
        raise _too_big(what, size)
    return value


def _check_width(name: str, width) -> None:
    if isinstance(width, int) and not isinstance(width, bool) and width > MAX_VALUE_CHARS:
        raise _too_big(f"{name}({width})", width)


_PERCENT = re.compile(r"%[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_BRACE_DIGITS = re.compile(r"\{[^{}]*?(\d+)[^{}]*\}|\{[^{}]*\{")


def _check_format(fmt, percent: bool) -> None:
    """Refuse format strings whose widths would build huge strings ('%999999999d', '{:>999999999}')."""
    if not isinstance(fmt, str):
        return
    if percent:
        for m in _PERCENT.finditer(fmt):
            for g in m.groups():
                if g == "*" or (g and int(g) > MAX_VALUE_CHARS):
                    raise TemplateLimit(f"the chat template formats with width {clip(m.group(0), 40)}; widths "
                                        f"are at most {MAX_VALUE_CHARS} and not '*'")
        return
    for m in _BRACE_DIGITS.finditer(fmt):
        if m.group(1) is None or int(m.group(1)) > MAX_VALUE_CHARS:
            raise TemplateLimit(f"the chat template formats with {clip(m.group(0), 40)}; widths are at most "
                                f"{MAX_VALUE_CHARS} and not nested")


def _check_replace(s, old, new) -> None:
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        size = len(s) + (len(s) + 1 if not old else s.count(old)) * len(new)
        if size > MAX_VALUE_CHARS:
            raise _too_big("replace(...)", size)


def _joined(items, sep) -> list:
    """`items` as a list, refused when joining it with `sep` would build too large a string."""
    items = list(items) if not isinstance(items, (list, tuple)) else items
    size = sum(_size(i) for i in items) + len(str(sep)) * max(0, len(items) - 1)
    if size > MAX_VALUE_CHARS:
        raise _too_big("join(...)", size)
    return items


def _precheck_method(obj, args, kwargs):
    """Arguments of a method call on a str; returns (possibly materialised) args."""
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    if not isinstance(owner, str):
        return args
    if name in ("center", "ljust", "rjust", "zfill", "expandtabs") and args:
        _check_width(name, args[0])
    elif name == "replace" and len(args) >= 2:
        _check_replace(owner, args[0], args[1])
    elif name == "join" and args:
        args = (_joined(args[0], owner),) + tuple(args[1:])
    return args


def _bounded_filter(name: str, fn):
    sig = inspect.signature(fn)

    @functools.wraps(fn)  # keeps jinja's pass_context / pass_eval_context marks
    def wrapper(*args, **kwargs):
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return fn(*args, **kwargs)  # the filter reports the bad call itself
        a = bound.arguments
        if name == "replace":
            _check_replace(a.get("s"), a.get("old"), a.get("new"))
        elif name == "join":
            a["value"] = _joined(a.get("value", ()), a.get("d", ""))
        elif name == "format":
            _check_format(a.get("value"), percent=True)
        elif name == "sum" and not isinstance(a.get("start", 0), (int, float)):
            raise TemplateLimit("the chat template sums non-numbers (sum(start=...)); build lists another way")
        elif name == "indent":
            s, width = a.get("s", ""), a.get("width", 4)
            per = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
            size = len(str(s)) + (str(s).count("\n") + 1) * per
            if size > MAX_VALUE_CHARS:
                raise _too_big("indent(...)", size)
        elif name == "wordwrap":
            s, width, wrap = str(a.get("s", "")), a.get("width", 79), a.get("wrapstring") or "\n"
            size = len(s) + (len(s) // max(1, int(width)) + 1) * len(str(wrap))
            if size > MAX_VALUE_CHARS:
                raise _too_big("wordwrap(...)", size)
        for key in ("width", "length", "linecount", "slices"):
            _check_width(name, a.get(key))
        return _checked(fn(*bound.args, **bound.kwargs), f"{name}(...)")

    return wrapper


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator, with built values and output text passed through the budget."""

    def _wrap(self, visit, node, frame) -> None:
        self.write("environment.qs_checked(")
        visit(node, frame)
        self.write(")")

    def visit_Concat(self, node, frame) -> None:
        self._wrap(super().visit_Concat, node, frame)

    def visit_List(self, node, frame) -> None:
        self._wrap(super().visit_List, node, frame)

    def visit_Dict(self, node, frame) -> None:
        self._wrap(super().visit_Dict, node, frame)

    def visit_Tuple(self, node, frame) -> None:
        if node.ctx == "load":
            self._wrap(super().visit_Tuple, node, frame)
        else:
            super().visit_Tuple(node, frame)

    def _output_child_pre(self, node, frame, finalize) -> None:
        self.write("environment.qs_output(")
        super()._output_child_pre(node, frame, finalize)

    def _output_child_post(self, node, frame, finalize) -> None:
        super()._output_child_post(node, frame, finalize)
        self.write(")")


class _Namespace(jinja2.utils.Namespace):
    """transformers' namespace: no underscore attributes (no reach into CPython internals)."""

    def __init__(*args, **kwargs):  # Namespace's signature trick, so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


class _Dict:  # transformers' `dict` global: construction only, no attribute tricks
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    if indent is not None and (len(indent) if isinstance(indent, str) else indent) > MAX_JSON_INDENT:
        raise TemplateLimit(f"tojson(indent=...) is at most {MAX_JSON_INDENT} in a chat template")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    _check_format(fmt, percent=True)  # glibc strftime takes widths too ('%999999999Y')
    return datetime.now().strftime(fmt)


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' chat-template environment, with the bounds of the module docstring."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset(["*", "**", "+", "%"])

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        self.filters["tojson"] = _tojson
        self.filters = {name: _bounded_filter(name, fn) for name, fn in self.filters.items()}
        self.globals.update(raise_exception=_raise_exception, dict=_Dict(), namespace=_Namespace,
                            strftime_now=_strftime_now)

    @staticmethod
    def concat(pieces) -> str:  # the buffers of {% set %} blocks, macros and filter blocks
        pieces = list(pieces)
        size = sum(map(len, pieces))
        if size > MAX_VALUE_CHARS:
            raise _too_big("a block", size)
        return "".join(pieces)

    @staticmethod
    def qs_checked(value):
        return _checked(value)

    @staticmethod
    def qs_output(text):
        budget = getattr(_state, "budget", None)
        if budget is not None:
            budget.add_output(len(text))
        return text

    def call_binop(self, context, operator, left, right):
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "**" and ints and right > 0 and abs(left) > 1:
            if right * abs(left).bit_length() > MAX_INT_BITS:
                raise TemplateLimit(f"the chat template computes {clip(left, 20)} ** {clip(right, 20)}, an integer "
                                    f"over {MAX_INT_BITS} bits")
        elif operator == "*" and ints:
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise TemplateLimit(f"the chat template multiplies integers into one over {MAX_INT_BITS} bits")
        elif operator == "*" and (isinstance(left, int) or isinstance(right, int)):
            n, seq = (left, right) if isinstance(left, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and n > 0:
                size = _size(seq) * n
                if size > MAX_VALUE_CHARS:
                    raise _too_big("a repetition ('*')", size)
        elif operator == "+" and not isinstance(left, (int, float)):
            size = _size(left) + _size(right)
            if size > MAX_VALUE_CHARS:
                raise _too_big("a sum ('+')", size)
        elif operator == "%":
            _check_format(left, percent=True)
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value):  # str.format / format_map, however they are reached
        if getattr(value, "__name__", "") in ("format", "format_map"):
            _check_format(getattr(value, "__self__", None), percent=False)
        return super().wrap_str_format(value)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
        args = _precheck_method(__obj, args, kwargs)
        return _checked(super().call(__context, __obj, *args, **kwargs), "a call's result")


_ENV = BoundedEnvironment()


@functools.lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    return _ENV.from_string(template)


def render_bounded(template: str, *, seconds: float = MAX_RENDER_S, **context) -> str:
    """Render `template` with `context` (messages=..., add_generation_prompt=..., special
    tokens) within the module's bounds: TemplateLimit past them; Jinja's own errors
    (syntax, raise_exception) propagate as jinja2.TemplateError. seconds: the time limit."""
    if getattr(_state, "budget", None) is not None:
        raise RuntimeError("render_bounded is not reentrant")
    budget = _state.budget = _Budget(seconds)
    previous = sys.gettrace()
    sys.settrace(_trace)
    try:
        compiled = _compile(template)
        out = []
        for piece in compiled.generate(**context):
            budget.add_output(0)  # output pieces are counted where the template converts them
            out.append(piece)
        return "".join(out)
    except _Expired:
        raise TemplateLimit(f"the chat template ran over {seconds:g} s for one render (loops too large); "
                            "make it render in milliseconds") from None
    except RecursionError:
        raise TemplateLimit("the chat template recurses too deeply") from None
    except MemoryError:
        raise TemplateLimit("the chat template ran out of memory") from None
    finally:
        sys.settrace(previous)
        _state.budget = None


# What registration renders an adapter's template with: a sample chat, with and without
# the generation prompt (what the trainer checks a job's template with).
_SAMPLE = [{"role": "system", "content": "sample system"}, {"role": "user", "content": "sample question 1"},
           {"role": "assistant", "content": "sample answer 2"}, {"role": "user", "content": "sample question 3"}]


def check_template_renders(text: str, shown: str) -> None:
    """Registration's test render of an adapter's chat template (`shown` names the file):
    InvalidArgument when it does not parse or exceeds the bounds on a sample chat. A
    template that refuses the sample (raise_exception) is accepted: requests decide."""
    for add in (False, True):
        try:
            render_bounded(text, messages=_SAMPLE, tools=None, documents=None, add_generation_prompt=add)
        except TemplateLimit as exc:
            raise InvalidArgument(f"{shown} exceeds the server's bounds on a sample chat: {exc}") from None
        except jinja2.TemplateSyntaxError as exc:
            raise InvalidArgument(f"{shown} is not a valid Jinja template (line {exc.lineno}): {clip(exc)}") from None
        except Exception:  # noqa: BLE001,S112 - refusing these messages is the template's right
            continue
