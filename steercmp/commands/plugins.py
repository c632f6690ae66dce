"""``steercmp plugins``: what loaded, from where, and what each plugin registered."""

from __future__ import annotations

from steercmp.plugin_manager import PluginSet


def plugins_command(plugins: PluginSet) -> int:
    print("plugins loaded:")
    for name, origin in plugins.sources:
        print(f"  {name}  ({origin})")
    for title, registry in (("methods", plugins.methods), ("controls", plugins.controls)):
        print(f"{title}:")
        for name, reg in sorted(registry.items()):
            print(f"  {name:<20} {reg.plugin} ({reg.origin})  {getattr(reg.cls, 'description', '')}")
    sections = plugins.report_sections()
    if sections:
        print("report sections:")
        for section in sections:
            print(f"  {section.name:<20} {section.title}")
    return 0
