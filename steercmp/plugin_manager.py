"""Build a plugin manager per run: built-ins, entry points, and an explicit plugins directory.

Plugins load only from three places: the built-in modules in :data:`DEFAULT_PLUGINS`, installed
distributions' ``steercmp`` entry points, and ``*.py`` files in a directory the user names.
Nothing loads at import time.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import pluggy

from steercmp import hookspecs
from steercmp.api import Control, Method, ReportSection
from steercmp.errors import PluginError

DEFAULT_PLUGINS: tuple[str, ...] = (
    "steercmp_plugins.controls",
    "steercmp_plugins.unembed",
    "steercmp_plugins.diffmean",
    "steercmp_plugins.nla",
    "steercmp_plugins.sae",
    "steercmp_plugins.prompting",
    "steercmp_plugins.counterfactual",
)


@attrs.frozen
class Registered:
    """A registered class and the plugin it came from (for ``steercmp plugins``)."""

    name: str
    cls: type
    plugin: str
    origin: str


class Registrar:
    """Collects classes of one kind and rejects duplicate names loudly."""

    def __init__(self, kind: str, base: type):
        self.kind = kind
        self.base = base
        self.items: dict[str, Registered] = {}
        self._current: tuple[str, str] = ("?", "?")

    def __call__(self, cls: type) -> None:
        plugin, origin = self._current
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise PluginError(
                f"plugin {plugin!r} registered {cls!r}, which is not a {self.base.__name__} subclass",
                fix=f"register a subclass of steercmp.api.{self.base.__name__}",
            )
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(
                f"plugin {plugin!r} registered {cls.__name__} without a name",
                fix="set the class attribute `name`",
            )
        if name in self.items:
            prev = self.items[name]
            raise PluginError(
                f"{self.kind} {name!r} is registered twice (by {prev.plugin!r} and {plugin!r})",
                fix="rename one of them",
            )
        self.items[name] = Registered(name, cls, plugin, origin)


@attrs.define
class PluginSet:
    """The facade the core uses: typed lookups instead of ``pm.hook`` calls scattered around."""

    pm: pluggy.PluginManager
    methods: dict[str, Registered]
    controls: dict[str, Registered]
    sources: list[tuple[str, str]]  # (plugin name, origin) in load order

    def method(self, name: str) -> type[Method]:
        return self.methods[name].cls  # type: ignore[return-value]

    def control(self, name: str) -> type[Control]:
        return self.controls[name].cls  # type: ignore[return-value]

    def report_sections(self) -> list[Any]:
        """Every plugin's :class:`steercmp.api.ReportSection` objects, in plugin load order."""
        found: list[ReportSection] = []

        def register(section: Any) -> None:
            if not isinstance(section, ReportSection):
                raise PluginError(f"register_report_sections got {section!r}, not a steercmp.api.ReportSection",
                                  fix="register ReportSection objects")
            if any(s.name == section.name for s in found):
                raise PluginError(f"report section {section.name!r} is registered twice", fix="rename one")
            found.append(section)

        for name, _origin in self.sources:  # load order (pluggy's own call order is the reverse)
            impl = getattr(self.pm.get_plugin(name), "register_report_sections", None)
            if impl is not None:
                impl(register=register)
        return found

    def commands(self) -> list[tuple[str, str, Any, Any]]:
        found: list[tuple[str, str, Any, Any]] = []
        names: set[str] = set()

        def register(name: str, help: str, configure: Any, handler: Any) -> None:
            if name in names:
                raise PluginError(f"command {name!r} is registered twice", fix="rename one")
            names.add(name)
            found.append((name, help, configure, handler))

        self.pm.hook.register_commands(register=register)
        return found


def _load_dir(directory: Path) -> list[tuple[str, Any]]:
    if not directory.is_dir():
        raise PluginError(
            f"plugins directory {str(directory)!r} does not exist",
            fix="pass an existing directory to --plugins-dir",
        )
    modules = []
    for path in sorted(directory.glob("*.py")):
        mod_name = f"steercmp_dir_plugin_{path.stem}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # a broken plugin file must name itself
            raise PluginError(
                f"plugin file {str(path)!r} failed to import: {type(exc).__name__}: {exc}",
                fix="fix or remove the file",
            ) from exc
        modules.append((str(path), module))
    return modules


def build_plugin_manager(
    builtins: Iterable[str] = DEFAULT_PLUGINS,
    *,
    entry_points: bool = True,
    plugins_dir: str | Path | None = None,
    extra: Iterable[Any] = (),
) -> PluginSet:
    """Create a fresh plugin manager, load plugins from the allowed places and collect registrations.

    ``extra`` takes plugin objects (modules or instances with hookimpls) — the way tests inject a
    plugin set without flags inside library code.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    sources: list[tuple[str, str]] = []
    for mod_path in builtins:
        module = importlib.import_module(mod_path)
        pm.register(module, name=mod_path)
        sources.append((mod_path, "built-in"))
    if entry_points:
        before = set(pm.get_plugins())
        try:
            pm.load_setuptools_entrypoints(hookspecs.PROJECT)
        except Exception as exc:
            raise PluginError(
                f"an installed steercmp entry-point plugin failed to load: {type(exc).__name__}: {exc}",
                fix="reinstall or uninstall that plugin",
            ) from exc
        dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
        for plugin in pm.get_plugins():
            if plugin not in before:
                dist = dists.get(id(plugin))
                where = f"entry point, {dist.project_name} {dist.version}" if dist is not None else "entry point"
                sources.append((str(pm.get_name(plugin)), where))
    if plugins_dir is not None:
        for path, module in _load_dir(Path(plugins_dir)):
            pm.register(module, name=path)
            sources.append((path, "plugins dir"))
    for obj in extra:
        name = getattr(obj, "__name__", None) or type(obj).__name__
        pm.register(obj, name=name)
        sources.append((name, "extra"))
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(
            f"a plugin implements an unknown hook: {exc}",
            fix="check the hook name against steercmp.hookspecs",
        ) from exc

    methods = Registrar("method", Method)
    controls = Registrar("control", Control)
    for plugin in pm.get_plugins():
        pname = pm.get_name(plugin) or repr(plugin)
        origin = next((o for n, o in sources if n == pname), "?")
        for registrar, hook in ((methods, "register_methods"), (controls, "register_controls")):
            impl = getattr(plugin, hook, None)
            if impl is None:
                continue
            registrar._current = (pname, origin)
            try:
                impl(register=registrar)
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"plugin {pname!r} raised in {hook}: {type(exc).__name__}: {exc}",
                    fix="fix the plugin or uninstall it",
                ) from exc
    return PluginSet(pm=pm, methods=methods.items, controls=controls.items, sources=sources)
