"""What user code can read besides the objects a call reaches: module globals and attributes of user modules.

A traced call's code loads globals (``STRENGTH``), attributes of modules it imported (``settings.STRENGTH``,
``import settings`` inside a method) and calls functions that do the same. Their values are baked into a plan,
so the plan guards them (``attribute_log.Recording`` turns what ``global_reads`` finds into reads).

Found from bytecode, for *user* code only (not loopgraph's engine, the standard library or installed libraries,
whose module state is machinery): the functions and methods of the modules the call's objects' classes come
from, and every function reached from there or from the call's objects (a block attribute holding a function,
a ``functools.partial``, a bound method), through decorators (``__wrapped__``, the function a wrapper's closure
holds: ``@torch.no_grad()``, ``functools.wraps``), ``staticmethod``/``classmethod``/``property``. Read afresh at
every trace (a class defined in a later notebook cell, code ``exec``'d into a module); each code object's names
are read once.

    globals             every global name the code loads that its namespace defines (builtins aside)
    closure variables   the cells a user function closes over (a block class made by a factory function)
    module attributes   for a user module the code reaches (a global, an import inside a function, a module held
                        in an attribute), each of its attributes whose name the scanned code loads as an
                        attribute or names in a string constant (``settings.STRENGTH``, ``getattr(settings,
                        "STRENGTH")``; ``settings.OFFSET`` that nothing loads is not a read)

Not seen, by design: attributes of installed libraries' and the standard library's modules (``torch.float16``,
``diffusers.utils.constants``), closure variables of their functions, and names built at run time
(``getattr(settings, f"STRENGTH_{k}")``).
"""

from __future__ import annotations

import dis
import functools
import sys
import types
import weakref
from typing import Any, Iterator, NamedTuple

import torch

__all__ = ["global_reads", "is_user_code", "is_engine_file"]

_PACKAGE_DIR = __file__.rsplit("/", 2)[0] + "/"  # loopgraph/
_ZOO_DIR = _PACKAGE_DIR + "zoo/"


def is_engine_file(filename: str) -> bool:
    """Whether ``filename`` is one of loopgraph's engine modules (the zoo's loops are user code)."""
    return filename.startswith(_PACKAGE_DIR) and not filename.startswith(_ZOO_DIR)


class CodeNames(NamedTuple):
    """The names a code object (and the code nested in it) loads."""

    globals: frozenset[str]   # LOAD_GLOBAL
    attrs: frozenset[str]     # LOAD_ATTR, LOAD_METHOD, IMPORT_FROM, and string constants: attribute names
    imports: frozenset[str]   # IMPORT_NAME: modules imported inside the function


_CODE_NAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # code object -> CodeNames


def code_names(code: types.CodeType) -> CodeNames:
    found = _CODE_NAMES.get(code)
    if found is None:
        names: tuple[set, set, set] = (set(), set(), set())
        for ins in dis.get_instructions(code):
            if ins.opname == "LOAD_GLOBAL":
                names[0].add(ins.argval)
            elif ins.opname in ("LOAD_ATTR", "LOAD_METHOD", "IMPORT_FROM"):
                names[1].add(ins.argval)
            elif ins.opname == "IMPORT_NAME":
                names[2].add(ins.argval)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                for mine, nested in zip(names, code_names(const)):
                    mine.update(nested)
            elif isinstance(const, str) and const.isidentifier():  # getattr(settings, "STRENGTH")
                names[1].add(const)
        found = _CODE_NAMES[code] = CodeNames(*map(frozenset, names))
    return found


def is_user_code(namespace: dict) -> bool:
    """Whether a module namespace (a function's ``__globals__``) is user code: not loopgraph's engine, the
    standard library or an installed library. A namespace without a file is its top-level package's kind, or
    user code when it is one (``__main__`` in a notebook, code exec'd into a new module)."""
    name = namespace.get("__name__") or ""
    filename = namespace.get("__file__") or ""
    top = name.split(".", 1)[0]
    if top in sys.stdlib_module_names or "-packages/" in filename:
        return False
    if not filename:  # a C extension's submodule, a namespace package: as its top-level package
        package = sys.modules.get(top)
        return package is None or vars(package) is namespace or is_user_code(vars(package))
    return not is_engine_file(filename)


def functions_of(value: Any) -> list[types.FunctionType]:
    """The Python functions ``value`` runs when called (or, for a class member, when used): through bound methods,
    ``functools.partial``, ``staticmethod``/``classmethod``/``property``, a decorator's ``__wrapped__`` and the
    functions a wrapper's closure holds."""
    found, todo, seen = [], [value], set()
    while todo:
        v = todo.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v, types.FunctionType):
            found.append(v)
            todo.append(vars(v).get("__wrapped__"))
            for cell in v.__closure__ or ():
                try:
                    todo.append(cell.cell_contents)
                except ValueError:  # an empty cell
                    pass
        elif isinstance(v, (types.MethodType, staticmethod, classmethod)):
            todo.append(v.__func__)
        elif isinstance(v, functools.partial):
            todo.append(v.func)
        elif isinstance(v, property):
            todo.extend((v.fget, v.fset, v.fdel))
    return found


def _data(value: Any) -> bool:
    """Whether a closure variable holds data a user may rebind: a value of a builtin type, a tensor or a user
    object; not a class, function or module (followed instead: ``super()``'s ``__class__``, a decorator's
    function), nor a library's object (the sentinels of dataclasses' generated ``__init__``)."""
    if isinstance(value, (type, types.ModuleType)) or functions_of(value):
        return False
    module = type(value).__module__
    return (module == "builtins" or isinstance(value, torch.Tensor)
            or is_user_code(vars(sys.modules[module]) if module in sys.modules else {}))


def _namespace_functions(namespace: dict) -> Iterator[types.FunctionType]:
    """The functions and methods defined in a module (whatever its globals hold that it defined)."""
    name = namespace.get("__name__")
    for value in list(namespace.values()):
        if getattr(value, "__module__", None) != name:
            continue
        if isinstance(value, type):
            for member in list(vars(value).values()):
                yield from functions_of(member)
        else:
            yield from functions_of(value)


def _owner(namespace: dict, proxies: dict[int, types.ModuleType]) -> types.ModuleType:
    """The module whose globals ``namespace`` is (a stand-in named like it when no module in sys.modules is)."""
    module = sys.modules.get(namespace.get("__name__") or "")
    if module is not None and vars(module) is namespace:
        return module
    return proxies.setdefault(id(namespace), types.ModuleType(namespace.get("__name__") or "<exec>"))


def global_reads(classes: list[type], reached: list[Any], *,
                 whole_modules: bool = True) -> Iterator[tuple[Any, dict | None, str, str]]:
    """(owner, holder, name, path) for every global, user-module attribute and closure variable that user code
    reachable from the call can load (see the module docstring): a module, its namespace and a name; or a closure
    cell, None and "cell_contents". ``classes``: those of the call's objects; ``reached``: the functions, methods,
    partials, classes and modules the call found in attributes. ``whole_modules=False``: only the code that
    ``classes`` and ``reached`` hold and the functions and classes it loads by name, not every function of their
    modules (what the code of some objects can load, not what any code beside them can)."""
    functions: list[types.FunctionType] = []
    modules: dict[int, types.ModuleType] = {}       # user modules reached as values: their attributes are reads
    scanned: set[int] = set()                        # namespaces scanned whole, functions scanned
    attrs: set[str] = set()
    yielded: set[tuple[int, str]] = set()

    def whole(namespace: dict) -> None:
        if whole_modules and id(namespace) not in scanned and is_user_code(namespace):
            scanned.add(id(namespace))
            functions.extend(_namespace_functions(namespace))

    def follow(value: Any) -> None:
        if isinstance(value, types.ModuleType):
            if is_user_code(vars(value)):
                modules.setdefault(id(value), value)
            return
        if isinstance(value, type):
            module = sys.modules.get(value.__module__)
            members = list(vars(value).values()) if module is None or is_user_code(vars(module)) else []
        else:
            members = [value]
        for fn in (fn for member in members for fn in functions_of(member)):
            functions.append(fn)
            whole(fn.__globals__)

    for value in [*classes, *reached]:
        follow(value)
    proxies: dict[int, types.ModuleType] = {}
    while True:
        while functions:
            fn = functions.pop()
            namespace = fn.__globals__
            if id(fn) in scanned or not is_user_code(namespace):
                continue
            scanned.add(id(fn))
            names = code_names(fn.__code__)
            attrs |= names.attrs
            for key in sorted(names.globals):
                if key in namespace and (id(namespace), key) not in yielded:
                    yielded.add((id(namespace), key))
                    owner = _owner(namespace, proxies)
                    yield owner, namespace, key, f"{owner.__name__}.{key}"
                    follow(namespace[key])
            for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
                try:
                    value = cell.cell_contents
                except ValueError:  # not bound yet
                    continue
                if _data(value):
                    yield cell, None, "cell_contents", f"{fn.__qualname__}: closure variable {name!r}"
                follow(value)
            for imported in names.imports:
                parts = imported.split(".")
                for k in range(len(parts)):
                    follow(sys.modules.get(".".join(parts[:k + 1])))
        fresh = [(module, key) for module in list(modules.values())  # attributes the scanned code loads
                 for key in sorted(attrs & vars(module).keys()) if (id(vars(module)), key) not in yielded]
        if not fresh:
            return
        for module, key in fresh:
            yielded.add((id(vars(module)), key))
            yield module, vars(module), key, f"{module.__name__}.{key}"
            follow(vars(module)[key])
