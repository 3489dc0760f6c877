"""Step loops inside plain blocks: compile the per-timestep loop where it is.

Some loops run the denoising steps inside a plain block: Helios, MiniMax Music 3 and Wan-Animate-2 loop over
chunks or segments in a loop wrapper, and one of its blocks runs a Python ``for`` loop over the timesteps in its own
``__call__`` (diffusers' ``HeliosChunkDenoiseInner``), with no ``loop_step`` to intercept. Taking each chunk as a
step would put the whole timestep loop, unrolled, in one step graph.

A **step loop** is a ``for`` statement in a block's ``__call__`` whose body calls a component's ``step`` method
(``components.scheduler.step(...)``: one denoising step per iteration). ``compile_loop`` on the wrapper around such
a block runs the wrapper's own loop (the chunks) eagerly, and each step loop as a compiled loop of its own:

- the block's ``__call__`` is recompiled from its source with the ``for`` statement replaced by a call to a runner
  (``StepLoop.function``); the loop's body becomes a function of one iteration (``StepLoop.step``), which loads the
  locals it may read before assigning them, runs the body unchanged and stores the locals a later iteration or the
  code after the loop reads (``_scan``: liveness);
- the runner (``InnerLoop.run``) builds a ``BlockState`` of what the body uses: the ``block_state`` attributes it
  names, the function's locals as ``local_<name>`` slots, tensors inside dict/list/tuple locals as data inputs of
  their own; what the loop iterates over is the schedule (its slot, or ``loop_items``). An ``InnerLoopWrapper``
  whose ``loop_step`` runs one iteration is compiled by ``compile_loop`` like any loop wrapper (traced, guarded,
  planned: one plan per chunk whose program or shapes differ);
- after the loop, the ``block_state`` attributes and the locals the body assigned are what the compiled loop left.

What is refused (the block then runs as it is, eagerly, and ``explain()`` says why): ``break``, ``continue``,
``return`` or ``del`` in the loop's body, ``yield``, ``global``/``nonlocal``, an ``else:`` on the loop, a ``try``
around it that catches or finalizes, a function defined outside the loop that reads a name the loop assigns, a
closure, private (mangled) names, a ``block_state`` used other than through its attributes, a decorator that cannot
be evaluated again, a source file that is not the code Python runs. A loop over anything but a tensor, list, tuple
or range (or ``enumerate`` of one), or with a progress bar used for more than ``update()``, runs its iterations as
written on that call.
"""

from __future__ import annotations

import __future__
import ast
import copy
import dis
import functools
import inspect
import operator
import textwrap
import threading
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm import tqdm

from .modular_pipelines.blocks import ModularPipelineBlocks
from .modular_pipelines.loop_blocks import LoopSequentialPipelineBlocks
from .modular_pipelines.state import BlockState, InputParam, OutputParam

__all__ = ["InnerLoop", "InnerLoopWrapper", "StepLoop", "find_step_loop", "step_loop_blocks", "wrapper_lock"]

LOCAL = "local_"       # a local variable's slot in the inner BlockState: local_latents
ITEMS = "loop_items"   # the iterations' items: the inner loop's schedule (its loop input)
_RUN, _OUT, _STEP_ARGS = "__lg_run", "__lg_out", ("__lg_block", "__lg_components", "__lg_state", "__lg_locals",
                                                   "__lg_item")


@dataclass
class StepLoop:
    """A block class's step loop: where it is, what its body uses, and the recompiled functions."""

    owner: type                      # the block's class
    where: str                       # "diffusers/modular_pipelines/helios/denoise.py:434"
    loads: tuple[str, ...]           # the function's locals the body reads (from before the loop, or an earlier
                                     # iteration)
    stores: tuple[str, ...]          # the locals the body assigns (the loop's target among them)
    state_attrs: tuple[str, ...]     # the block_state attributes the body names
    enumerate: bool                  # ``for ... in enumerate(x)``: the inner wrapper enumerates x itself
    schedule: str                    # the inner BlockState slot of what the loop iterates over (its loop input)
    updated_only: frozenset[str]     # slots the body uses only as ``x.update(...)`` (a progress bar may be one)
    step: Callable                   # step(block, components, block_state, locals, item): one iteration
    function: Callable[[Callable], Callable]  # the block's __call__ with the loop replaced, given a runner
    problem: str | None = None       # why it cannot be compiled (None: it can)

    @classmethod
    def refused(cls, owner: type, where: str, problem: str) -> "StepLoop":
        """A step loop that cannot be compiled where it is: its block runs as it is."""
        return cls(owner, where, (), (), (), False, ITEMS, frozenset(), lambda *a: None, lambda run: owner.__call__,
                   problem)


def _source_where(fn) -> tuple[str, int]:
    code = fn.__code__
    return code.co_filename, code.co_firstlineno


def _short_path(path: str) -> str:
    for marker in ("site-packages/", "/loopgraph/"):
        if marker in path:
            return path.split(marker, 1)[1] if marker == "site-packages/" else "loopgraph/" + path.split(marker, 1)[1]
    return path


def _is_step_call(node: ast.AST, components: str) -> bool:
    """``components.<x>.step(...)``: a scheduler step."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "step"
            and isinstance(node.func.value, ast.Attribute) and isinstance(node.func.value.value, ast.Name)
            and node.func.value.value.id == components)


def _loops(statements: list[ast.stmt], in_try: bool = False):
    """(``for`` statement, inside a ``try`` that catches or finalizes) for a function body's loops, outermost first
    (descending into ``with``, ``if`` and ``try``, not into loops or nested functions)."""
    for stmt in statements:
        if isinstance(stmt, ast.For):
            yield stmt, in_try
        elif isinstance(stmt, (ast.With, ast.If, ast.Try)):
            catches = in_try or isinstance(stmt, ast.Try) and bool(stmt.handlers or stmt.finalbody)
            for name in ("body", "orelse", "finalbody", "handlers"):
                for part in getattr(stmt, name, []):
                    yield from _loops(part.body if isinstance(part, ast.ExceptHandler) else [part], catches)


def _own_statements(node: ast.AST):
    """The nodes of a loop body outside nested loops and function scopes (where break/continue/return act)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        yield child
        if not isinstance(child, (ast.For, ast.AsyncFor, ast.While)):
            yield from _own_statements(child)
        else:  # a nested loop's own break/continue are its own; a return in it still leaves the function
            yield from (n for n in ast.walk(child) if isinstance(n, ast.Return))


def _refuse(loop: ast.For, fdef: ast.FunctionDef, state_name: str) -> str | None:
    if loop.orelse:
        return "the loop has an `else:` clause"
    for node in _own_statements(loop):
        if isinstance(node, (ast.Break, ast.Continue, ast.Return)):
            return f"`{type(node).__name__.lower()}` in the loop's body (line {node.lineno})"
    for node in ast.walk(fdef):
        if isinstance(node, (ast.Yield, ast.YieldFrom, ast.Await, ast.Global, ast.Nonlocal)):
            return f"`{type(node).__name__.lower()}` in the function"
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        if name and name.startswith("__") and not name.endswith("__"):
            return f"a private (name-mangled) name `{name}`"
    parents = _parents(loop)
    for node in ast.walk(loop):
        if isinstance(node, ast.Name) and node.id == state_name:
            parent = parents.get(node)
            if not (isinstance(parent, ast.Attribute) and parent.value is node):
                return f"`{state_name}` used other than through its attributes (line {node.lineno})"
        if isinstance(node, ast.Delete):  # a deleted local or attribute would come back after the loop
            return f"`del` in the loop's body (line {node.lineno})"
    assigned = _stores_in(loop.body) | _stores(loop.target)
    inside = {id(n) for n in ast.walk(loop)}
    for node in ast.walk(fdef):  # a function made outside the loop reads the function's variables, not the step's
        if id(node) not in inside and isinstance(node, (ast.Lambda, ast.FunctionDef, ast.GeneratorExp)):
            shared = sorted(_loads(node) & assigned) if node is not fdef else []
            if shared:
                return (f"a function defined outside the loop (line {node.lineno}) reads {shared}, which the loop "
                        f"assigns")
    return None


def _stores_in(statements: list[ast.stmt]) -> set[str]:
    """Every name a block of statements assigns, anywhere in it but in nested functions."""
    return set().union(*(_stores(stmt) for stmt in statements)) | {
        n.id for stmt in statements for n in ast.walk(stmt) if isinstance(n, ast.Name)
        and isinstance(n.ctx, ast.Store)}


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}


def _function_locals(fdef: ast.FunctionDef) -> set[str]:
    """The names local to a function (its parameters and what it assigns), by Python's own scoping."""
    import symtable

    table = symtable.symtable(ast.unparse(fdef), "<inner>", "exec").get_children()[0]
    return {s.get_name() for s in table.get_symbols() if s.is_local()}


def _loads(node: ast.AST, bound: frozenset = frozenset()) -> set[str]:
    """The names an expression or statement reads, without those its comprehensions and lambdas bind."""
    if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
        inner = bound | {n.id for g in node.generators for n in ast.walk(g.target) if isinstance(n, ast.Name)}
        parts = [node.generators[0].iter] + [p for g in node.generators[1:] for p in (g.iter,)]
        out = _loads(parts[0], bound)
        for part in [*parts[1:], *(c for g in node.generators for c in g.ifs),
                     *([node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt])]:
            out |= _loads(part, inner)
        return out
    if isinstance(node, (ast.Lambda, ast.FunctionDef, ast.AsyncFunctionDef)):
        inner = bound | {a.arg for a in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs,
                                         *filter(None, [node.args.vararg, node.args.kwarg])]}
        return set().union(*(_loads(c, inner) for c in ast.iter_child_nodes(node)))
    if isinstance(node, ast.Name):
        return {node.id} - bound if isinstance(node.ctx, ast.Load) else set()
    return set().union(*(_loads(c, bound) for c in ast.iter_child_nodes(node)))


def _stores(node: ast.AST) -> set[str]:
    """The names a simple statement surely assigns (not inside comprehensions or lambdas, not by a walrus that
    might not run, not by a bare annotation)."""
    if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.Lambda, ast.NamedExpr)):
        return set()
    if isinstance(node, ast.AnnAssign) and node.value is None:
        return set()
    own = {node.id} if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) else set()
    return own.union(*(_stores(c) for c in ast.iter_child_nodes(node)))


def _scan(statements: list[ast.stmt], definite: set[str], exposed: set[str]) -> None:
    """Add to ``exposed`` the names ``statements`` may read before assigning them, ``definite`` holding those
    surely assigned so far (what a branch, a loop's body or a ``try`` assigns is sure only inside it)."""
    for stmt in statements:
        if isinstance(stmt, ast.With):
            for item in stmt.items:
                exposed |= _loads(item.context_expr) - definite
                definite |= _stores(item.optional_vars) if item.optional_vars is not None else set()
            _scan(stmt.body, definite, exposed)
        elif isinstance(stmt, (ast.If, ast.While)):
            exposed |= _loads(stmt.test) - definite
            _scan(stmt.body, set(definite), exposed)
            _scan(stmt.orelse, set(definite), exposed)
        elif isinstance(stmt, ast.For):
            exposed |= _loads(stmt.iter) - definite
            _scan(stmt.body, definite | _stores(stmt.target), exposed)
            _scan(stmt.orelse, set(definite), exposed)
        elif isinstance(stmt, ast.Try):
            for part in [stmt.body, *(h.body for h in stmt.handlers), stmt.orelse, stmt.finalbody]:
                _scan(part, set(definite), exposed)
        elif isinstance(stmt, (ast.Match, ast.AsyncFor, ast.AsyncWith, ast.TryStar)):
            exposed |= _loads(stmt) - definite
        else:
            reads = _loads(stmt) | (_stores(stmt.target) if isinstance(stmt, ast.AugAssign) else set())
            exposed |= reads - definite
            definite |= _stores(stmt) | ({stmt.name} if isinstance(stmt, (ast.FunctionDef, ast.ClassDef)) else set())


def _assigned(step_source: str) -> set[str]:
    """The names the step function's source assigns in its own scope (not in its comprehensions)."""
    import symtable

    table = symtable.symtable(step_source, "<inner>", "exec").get_children()[0]
    return {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()}


_FOUND: "weakref.WeakKeyDictionary[type, tuple[Callable, StepLoop | None]]" = weakref.WeakKeyDictionary()


def find_step_loop(block: Any) -> StepLoop | None:
    """The step loop in ``type(block).__call__``, or None when it has none (``StepLoop.problem`` says why one
    cannot be compiled). Read from the source once per class (again if its ``__call__`` changes)."""
    owner = type(block)
    cached = _FOUND.get(owner)
    if cached is None or cached[0] is not owner.__call__:
        cached = _FOUND[owner] = (owner.__call__, _find(owner))
    return cached[1]


def _find(owner: type) -> StepLoop | None:
    fn = inspect.unwrap(owner.__call__)
    if not isinstance(fn, types.FunctionType):
        return None
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return None
    fdef = ast.parse(source).body[0]
    if not isinstance(fdef, ast.FunctionDef) or len(fdef.args.args) < 3:
        return None
    self_name, components_name, state_name = (a.arg for a in fdef.args.args[:3])
    loop, in_try = next(((stmt, in_try) for stmt, in_try in _loops(fdef.body)
                         if any(_is_step_call(n, components_name) for n in ast.walk(stmt))), (None, False))
    if loop is None:
        return None
    filename, first = _source_where(fn)
    ast.increment_lineno(fdef, first - 1)
    where = f"{_short_path(filename)}:{loop.lineno}"
    problem = _refuse(loop, fdef, state_name)
    if problem is None and in_try:
        problem = "the loop is inside a `try` that catches or finalizes (what the steps wrote before an error)"
    if problem is None and fn.__code__.co_freevars:
        problem = f"the function is a closure (free variables {list(fn.__code__.co_freevars)})"
    if problem is None and not _same_code(fdef, fn):
        problem = "its source file is not the code Python runs (edited since it was imported)"
    if problem is not None:
        return StepLoop.refused(owner, where, problem)
    try:
        return _build(owner, fn, fdef, loop, where, (self_name, components_name, state_name))
    except Exception as e:  # a decorator that cannot be evaluated again (defined in the class body), ...
        return StepLoop.refused(owner, where, f"it cannot be recompiled ({type(e).__name__}: {e})")


def _same_code(fdef: ast.FunctionDef, fn: types.FunctionType) -> bool:
    """Whether the function's source, compiled again, is the bytecode Python runs."""
    bare = copy.deepcopy(fdef)
    bare.decorator_list = []
    flags = fn.__code__.co_flags & _FUTURE_FLAGS
    try:
        code = compile(ast.Module([bare], type_ignores=[]), fn.__code__.co_filename, "exec", flags=flags,
                       dont_inherit=True)
    except SyntaxError:
        return False
    again = next(c for c in code.co_consts if isinstance(c, types.CodeType) and c.co_name == fdef.name)
    return _instructions(again) == _instructions(fn.__code__)


_CALL_SETUP = {"CACHE", "PRECALL", "PUSH_NULL", "KW_NAMES", "NOP", "RESUME", "EXTENDED_ARG"}


def _instructions(code: types.CodeType) -> list[tuple]:
    """What a code object does, as (operation, operand) pairs, nested code objects included; how calls are set up
    (a method call's ``LOAD_METHOD`` or ``LOAD_ATTR``, which compiling the same tree in another module may choose
    differently: pytest's assertion rewriting) and jump offsets are left out."""
    out: list[tuple] = []
    for ins in dis.get_instructions(code):
        if ins.opname in _CALL_SETUP:
            continue
        name = "LOAD_ATTR" if ins.opname == "LOAD_METHOD" else ins.opname
        if isinstance(ins.argval, types.CodeType):
            out.append((name, tuple(_instructions(ins.argval))))
        else:
            out.append((name, None if ins.opcode in dis.hasjrel or ins.opcode in dis.hasjabs else ins.argval))
    return out


_FUTURE_FLAGS = functools.reduce(operator.or_, (getattr(__future__, feature).compiler_flag
                                                 for feature in __future__.all_feature_names))


def _build(owner, fn, fdef: ast.FunctionDef, loop: ast.For, where: str, params) -> StepLoop:
    self_name, components_name, state_name = params
    iterable = loop.iter
    enumerated = (isinstance(iterable, ast.Call) and isinstance(iterable.func, ast.Name)
                  and iterable.func.id == "enumerate" and len(iterable.args) == 1 and not iterable.keywords)
    if enumerated:
        iterable = iterable.args[0]
    function_locals = _function_locals(fdef) - set(params)
    # the step function: one iteration, the body as it is
    body = ast.parse(f"def __lg_step({', '.join(_STEP_ARGS)}):\n    pass")
    body.body[0].body = [ast.Assign([loop.target], ast.Name("__lg_item", ast.Load()))] + loop.body
    ast.fix_missing_locations(body)
    assigned = _assigned(ast.unparse(body))
    # liveness: the body needs the locals it may read before assigning them (set before the loop, or by the
    # previous iteration); it keeps those of its assignments a later iteration or the code after the loop reads
    exposed: set[str] = set()
    _scan(body.body[0].body, set(), exposed)
    after = {n.id for n in ast.walk(fdef) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
             and n.lineno > loop.end_lineno}
    loads = tuple(sorted(exposed & function_locals))
    stores = tuple(sorted(assigned & function_locals & (exposed | after)))
    attrs = tuple(sorted({n.attr for n in ast.walk(loop) if isinstance(n, ast.Attribute)
                          and isinstance(n.value, ast.Name) and n.value.id == state_name}))
    # what the loop iterates over: a local's slot, a block_state attribute's, or a slot of its own
    schedule = ITEMS
    if isinstance(iterable, ast.Name) and iterable.id in function_locals:
        schedule, loads = LOCAL + iterable.id, tuple(sorted({*loads, iterable.id}))
    elif (isinstance(iterable, ast.Attribute) and isinstance(iterable.value, ast.Name)
          and iterable.value.id == state_name):
        schedule, attrs = iterable.attr, tuple(sorted({*attrs, iterable.attr}))
    clash = [a for a in attrs if a.startswith(LOCAL) or a == ITEMS]
    if clash:
        return StepLoop.refused(owner, where, f"{state_name} attributes {clash} clash with the inner loop's slots")
    prologue = [f"{self_name} = __lg_block", f"{components_name} = __lg_components", f"{state_name} = __lg_state"]
    prologue += [f"if hasattr(__lg_locals, {LOCAL + n!r}): {n} = __lg_locals.{LOCAL + n}" for n in loads]
    epilogue = [f"try:\n    __lg_locals.{LOCAL + n} = {n}\nexcept NameError:\n    pass" for n in stores]
    body.body[0].body = [*_parse(loop.lineno, prologue), *body.body[0].body, *_parse(loop.lineno, epilogue)]
    step = _function(body, "__lg_step", fn, where)

    # the block's __call__, its loop replaced by the runner
    call = copy.deepcopy(fdef)  # (the loop found in the copy by its position)
    new_loop = next(n for n in ast.walk(call) if isinstance(n, ast.For) and n.lineno == loop.lineno
                    and n.col_offset == loop.col_offset)
    replacement = _parse(loop.lineno, [
        f"{_OUT} = {_RUN}({self_name}, {components_name}, {state_name}, {ast.unparse(iterable)}, locals())",
        *(f"if {n!r} in {_OUT}: {n} = {_OUT}[{n!r}]" for n in stores)])
    _replace(call, new_loop, replacement)
    call.decorator_list = []
    call.args.kwonlyargs.append(ast.arg(_RUN))
    call.args.kw_defaults.append(None)
    ast.fix_missing_locations(call)
    undecorated = _function(ast.Module([call], type_ignores=[]), call.name, fn, where)
    decorators = [eval(compile(ast.Expression(d), where, "eval"), fn.__globals__) for d in fdef.decorator_list]

    def function(run: Callable) -> Callable:
        new = types.FunctionType(undecorated.__code__, fn.__globals__, fn.__name__, fn.__defaults__)
        new.__kwdefaults__ = {**(fn.__kwdefaults__ or {}), _RUN: run}
        for decorator in reversed(decorators):
            new = decorator(new)
        return new

    return StepLoop(owner, where, loads, stores, attrs, enumerated, schedule, _updated_only(loop, state_name), step,
                    function)


def _updated_only(loop: ast.For, state_name: str) -> frozenset[str]:
    """The slots (a local's, a block_state attribute's) the loop uses only to call ``.update(...)`` on: a progress
    bar there can be advanced for it."""
    parents = _parents(loop)
    only: dict[str, bool] = {}
    for node in ast.walk(loop):
        if isinstance(node, ast.Name) and node.id != state_name:
            key = LOCAL + node.id
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == state_name:
            key = node.attr
        else:
            continue
        use = parents.get(node)
        updates = (isinstance(use, ast.Attribute) and use.attr == "update" and isinstance(parents.get(use), ast.Call)
                   and parents[use].func is use)
        only[key] = only.get(key, True) and updates
    return frozenset(k for k, ok in only.items() if ok)


def _parse(line: int, lines: list[str]) -> list[ast.stmt]:
    """Statements from source lines, placed at ``line`` of the original file (for tracebacks)."""
    statements = ast.parse("\n".join(lines)).body if lines else []
    for node in (n for stmt in statements for n in ast.walk(stmt)):
        if "lineno" in node._attributes:
            node.lineno = node.end_lineno = line
    return statements


def _replace(tree: ast.AST, old: ast.stmt, new: list[ast.stmt]) -> None:
    for parent in ast.walk(tree):
        for name in ("body", "orelse", "finalbody"):
            stmts = getattr(parent, name, None)
            if isinstance(stmts, list) and old in stmts:
                k = stmts.index(old)
                stmts[k:k + 1] = new
                return
    raise AssertionError("the loop statement is not in its function")


def _function(module: ast.Module, name: str, fn, where: str) -> types.FunctionType:
    """The function ``name`` defined by ``module``, compiled as if in ``fn``'s file, with ``fn``'s globals."""
    ast.fix_missing_locations(module)
    code = compile(module, fn.__code__.co_filename, "exec")
    inner = next(c for c in code.co_consts if isinstance(c, types.CodeType) and c.co_name == name)
    return types.FunctionType(inner, fn.__globals__, name)


# -- running it ---------------------------------------------------------------------------------------------------
class _StepBody(ModularPipelineBlocks):
    """The inner loop's one block: one iteration of the step loop's body, on the inner BlockState."""

    def __init__(self, block: Any, loop: StepLoop) -> None:
        self.block, self.loop = block, loop

    @property
    def description(self) -> str:
        return f"one iteration of the step loop in {self.loop.owner.__name__}.__call__ ({self.loop.where})"

    def __call__(self, components, block_state: BlockState, item: Any = None):
        self.loop.step(self.block, components, block_state, block_state, item)
        return components, block_state


class _InnerState:
    """What an inner loop call is given and leaves: its BlockState's values (the wrapper's ``state``)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values


class InnerLoopWrapper(LoopSequentialPipelineBlocks):
    """The step loop of a plain block as a loop wrapper: its ``__call__`` loops over ``loop_items``, its one
    sub-block runs an iteration of the loop's body. ``compile_loop`` compiles it like any loop wrapper."""

    model_name = None

    def __init__(self, block: Any, loop: StepLoop, name: str) -> None:
        self.block, self.loop, self.name = block, loop, name
        self.sub_blocks = {name: _StepBody(block, loop)}
        self.block_classes, self.block_names = [_StepBody], [name]

    @property
    def description(self) -> str:
        return f"the step loop in {self.loop.owner.__name__}.__call__ ({self.loop.where})"

    @property
    def loop_inputs(self) -> list[InputParam]:
        return [InputParam(self.loop.schedule)]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        """What the block reads after the loop: the locals it keeps, the block_state attributes it names (also
        those first set inside the loop)."""
        return [OutputParam(LOCAL + n) for n in self.loop.stores] + [OutputParam(a) for a in self.loop.state_attrs]

    def get_block_state(self, state: _InnerState) -> BlockState:
        return BlockState(**state.values)

    def set_block_state(self, state: _InnerState, block_state: BlockState) -> None:
        state.values.update(vars(block_state))

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        schedule = getattr(block_state, self.loop.schedule)
        with self.progress_bar(total=len(schedule)) as bar:
            for item in enumerate(schedule) if self.loop.enumerate else schedule:
                bar.step_begins()
                components, block_state = self.loop_step(components, block_state, item=item)
                bar.step_ends()
        self.set_block_state(state, block_state)
        return components, state

    def progress_bar(self, iterable=None, total: int | None = None) -> "_Bars":
        """The progress bars the block's loop updates (its own, given on each call): advanced as the body advanced
        them (each step eagerly; per chunk of steps compiled, by what the traced steps did), not closed."""
        return _Bars()


@dataclass
class InnerLoop:
    """One block's step loop in a compiled wrapper: the loop, its compiled inner wrapper (made on first use) and
    why it runs eagerly when it does."""

    name: str
    block: Any
    loop: StepLoop
    compile: Callable[[InnerLoopWrapper], Any]   # compile_loop with the outer loop's options
    compiled: Any = None                         # the inner CompiledLoop
    as_written: dict[str, int] = field(default_factory=dict)  # why calls ran the loop as written: how many
    stand_ins: dict[str, "_NoBar"] = field(default_factory=dict)  # progress bars' stand-ins, by slot
    bar_steps: dict[int, list[int]] = field(default_factory=dict)  # by step count: what each step added to bars

    def proxy(self) -> "_Proxy":
        """What runs in the block's place: its ``__call__`` with the loop replaced by ``run``."""
        return _Proxy(self.block, self.loop.function(self.run))

    def run(self, block, components, block_state, iterable, local_vars: dict[str, Any]) -> dict[str, Any]:
        loop = self.loop
        if not isinstance(iterable, (torch.Tensor, list, tuple, range)):
            # an iterator, a generator: listing it ahead could change what the loop sees; run it as written
            return self._eager(f"it iterates over a {type(iterable).__name__} (not a tensor, list, tuple or range)",
                               block, components, block_state, iterable, local_vars)
        values = {a: getattr(block_state, a) for a in loop.state_attrs if hasattr(block_state, a)}
        values.update({LOCAL + n: local_vars[n] for n in loop.loads if n in local_vars})
        values[loop.schedule] = iterable
        bars = {name: value for name, value in values.items() if isinstance(value, tqdm)}
        used = sorted(name for name in bars if name not in loop.updated_only)
        if used:
            return self._eager(f"its progress bar {used[0]!r} is used for more than update()", block, components,
                               block_state, iterable, local_vars)
        for name in bars:  # progress bars: the inner wrapper's loop advances them
            values[name] = self.stand_ins.setdefault(name, _NoBar())
        # a carried local that holds the caller's tensor (updated in place, then rebound: minimax' latents) is also
        # given as a slot of its own, which keeps the tensor: what the loop leaves in it is copied into the caller's
        given = {f"{LOCAL}{n}:given": values[LOCAL + n] for n in loop.stores
                 if isinstance(values.get(LOCAL + n), torch.Tensor)}
        values.update(given)
        aliases = given | {f"{name}:{path}": t for name, value in list(values.items()) if name != loop.schedule
                   for path, t in _tensors_inside(value)}
        values.update(aliases)  # tensors in a dict (list, tuple) are data inputs too: by spec, not by value
        if self.compiled is None:
            self.compiled = self.compile(InnerLoopWrapper(block, loop, self.name))
        state = _InnerState(values)
        steps = len(iterable)
        _CALL.bars, _CALL.amounts, _CALL.recorded = list(bars.values()), [], self.bar_steps.get(steps)
        try:
            self.compiled(components, state)
        finally:
            amounts, _CALL.bars, _CALL.amounts = _CALL.amounts, [], []
        if len(amounts) == steps:  # the loop ran its steps in Python (traced, or eagerly): how they moved the bars
            self.bar_steps[steps] = amounts
        out = {k: bars.get(k, v) if isinstance(v, _NoBar) else v for k, v in state.values.items()
               if k not in aliases}
        for a in loop.state_attrs:
            if a in out:
                setattr(block_state, a, out[a])
        return {n: out[LOCAL + n] for n in loop.stores if LOCAL + n in out}

    def _eager(self, why: str, block, components, block_state, iterable, local_vars) -> dict[str, Any]:
        self.as_written[why] = self.as_written.get(why, 0) + 1
        ns = types.SimpleNamespace(**{LOCAL + n: local_vars[n] for n in self.loop.loads if n in local_vars})
        for item in (enumerate(iterable) if self.loop.enumerate else iterable):
            self.loop.step(block, components, block_state, ns, item)
        return {n: getattr(ns, LOCAL + n) for n in self.loop.stores if hasattr(ns, LOCAL + n)}


class _Proxy:
    """A block whose ``__call__`` is the recompiled one; every other attribute is the block's own."""

    def __init__(self, block: Any, function: Callable) -> None:
        self.__dict__["_block"], self.__dict__["_function"] = block, function

    def __call__(self, components, block_state, *args, **kwargs):
        return self._function(self._block, components, block_state, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._block, name)

    @property
    def __class__(self):  # error messages name the block's class (diffusers' loop_step: block.__class__.__name__)
        return type(self._block)


_CALL = threading.local()  # the progress bars of the inner loop call running in this thread


def _tensors_inside(value: Any, path: str = "", depth: int = 0):
    """(path, tensor) for the tensors in a dict, list or tuple (nested up to 3 deep): ``['history'][0]``."""
    if depth >= 3 or type(value) not in (dict, list, tuple):
        return
    for key, item in (value.items() if type(value) is dict else enumerate(value)):
        where = f"{path}[{key!r}]"
        if isinstance(item, torch.Tensor):
            yield where, item
        else:
            yield from _tensors_inside(item, where, depth + 1)


class _NoBar:
    """Stands in for a progress bar inside the step loop's body (the same object on every call, so the plan's
    guard sees the same input): it notes what each step adds, and the inner wrapper advances the real bars."""

    def update(self, n: int = 1) -> None:
        steps = getattr(_CALL, "amounts", None)
        if steps:
            steps[-1] += n


class _Bars:
    """The call's progress bars as one, never closed. The inner wrapper's own loop advances them by what each step
    added (``step_begins``/``step_ends``); a compiled call, by chunks of steps (``update``), as the traced steps
    did."""

    total = None  # a bar may count more than this loop's steps (all chunks'): never filled up to its total

    def __init__(self) -> None:
        self.bars, self.recorded, self.done = getattr(_CALL, "bars", []), getattr(_CALL, "recorded", None), 0

    def _advance(self, n: int) -> None:
        for bar in self.bars:
            if n:
                bar.update(n)

    def step_begins(self) -> None:
        _CALL.amounts.append(0)

    def step_ends(self) -> None:
        self._advance(_CALL.amounts[-1])

    def update(self, n: int = 1) -> None:
        steps = self.recorded[self.done:self.done + n] if self.recorded is not None else [1] * n
        self.done += n
        self._advance(sum(steps))

    def __enter__(self) -> "_Bars":
        return self

    def __exit__(self, *exc) -> None:
        pass


_LOCKS: "weakref.WeakKeyDictionary[Any, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def wrapper_lock(wrapper: Any) -> threading.Lock:
    """One lock per wrapper: a call that puts its blocks' proxies in the wrapper holds it (two compiled loops of one
    wrapper, or one from two threads, never see each other's proxies)."""
    with _LOCKS_LOCK:
        try:
            return _LOCKS.setdefault(wrapper, threading.Lock())
        except TypeError:  # not weakly referenceable: one lock for all such wrappers
            return _LOCKS_LOCK_FALLBACK


_LOCKS_LOCK_FALLBACK = threading.Lock()


def step_loop_blocks(wrapper: Any) -> dict[str, StepLoop]:
    """The blocks of ``wrapper`` whose ``__call__`` holds a step loop, by name."""
    found = {}
    for name, block in getattr(wrapper, "sub_blocks", {}).items():
        loop = find_step_loop(block)
        if loop is not None:
            found[name] = loop
    return found
