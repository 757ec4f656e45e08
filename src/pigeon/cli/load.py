"""Find and import the app ``pigeon run`` was given (``MODULE:ATTR``).

``MODULE`` is a module name importable from the current directory
(``shop``, ``myproject.app``) or the path of a ``.py`` file
(``examples/app/shop.py``); ``ATTR`` is the name of the :class:`pigeon.App`
in it, ``app`` when left out. Whatever stops the app from loading is one
:class:`AppNotLoaded` whose message names the problem in one line.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass

from ..app import App
from ..errors import ConfigurationError

DEFAULT_ATTRIBUTE = "app"


class AppNotLoaded(ConfigurationError):
    """The app named on the command line cannot be imported, or is not an
    App; ``reference`` is what was given. The user's own exception, if any,
    is the ``__cause__``."""

    def __init__(self, reference: str, why: str) -> None:
        super().__init__(f"cannot load the app {reference!r}: {why}")
        self.reference = reference


@dataclass(frozen=True, slots=True)
class AppReference:
    """Where an app is: ``module`` imported with ``directory`` first on
    ``sys.path``, then its ``attribute``."""

    text: str
    module: str
    attribute: str
    directory: str


def parse_reference(text: str, cwd: str) -> AppReference:
    """Read ``MODULE[:ATTR]`` (``MODULE`` a dotted name or a ``.py`` path).

    Raises:
        AppNotLoaded: it is neither.
    """
    target, _, attribute = text.rpartition(":") if ":" in text else (text, "", "")
    attribute = attribute or DEFAULT_ATTRIBUTE
    if not attribute.isidentifier():
        raise AppNotLoaded(text, f"{attribute!r} is not an attribute name")
    if target.endswith(".py") or os.sep in target:
        path = os.path.abspath(os.path.join(cwd, target))
        module = os.path.splitext(os.path.basename(path))[0]
        if not os.path.isfile(path):
            raise AppNotLoaded(text, f"no file {path}")
        if not module.isidentifier():
            raise AppNotLoaded(text, f"{os.path.basename(path)!r} cannot be imported by name")
        return AppReference(text, module, attribute, os.path.dirname(path))
    if not target or not all(part.isidentifier() for part in target.split(".")):
        raise AppNotLoaded(text, "expected MODULE:ATTR, e.g. shop:app or examples/app/shop.py")
    return AppReference(text, target, attribute, os.path.abspath(cwd))


def load_app(reference: AppReference) -> App:
    """Import the module and return its app.

    Raises:
        AppNotLoaded: no such module or attribute, not an App, or the
            module raised while it was imported (the ``__cause__``).
    """
    if reference.directory not in sys.path:
        sys.path.insert(0, reference.directory)
    text, name = reference.text, reference.module
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise AppNotLoaded(
                text, f"no module named {exc.name!r} (looked in {reference.directory})"
            ) from exc
        raise AppNotLoaded(text, f"importing {name!r} raised {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        # The user's module may raise anything while it is imported: each
        # becomes this one error, the original kept as its cause.
        raise AppNotLoaded(text, f"importing {name!r} raised {type(exc).__name__}: {exc}") from exc
    try:
        app = getattr(module, reference.attribute)
    except AttributeError:
        apps = sorted(key for key, value in vars(module).items() if isinstance(value, App))
        hint = f" (its apps: {', '.join(apps)})" if apps else " (it has no pigeon.App)"
        raise AppNotLoaded(
            text, f"module {name!r} has no attribute {reference.attribute!r}{hint}"
        ) from None
    if not isinstance(app, App):
        raise AppNotLoaded(
            text, f"{name}.{reference.attribute} is a {type(app).__name__}, not a pigeon.App"
        )
    return app


def source_directory(reference: AppReference) -> str:
    """The directory that holds the app's code, once it is loaded: the
    module's own for a plain module, its top package's for a module in a
    package (what ``--reload`` watches)."""
    top = sys.modules.get(reference.module.split(".")[0])
    paths = list(getattr(top, "__path__", None) or [])
    if paths:
        return str(paths[0])
    file = getattr(top, "__file__", None)
    return os.path.dirname(os.path.abspath(file)) if file else reference.directory
