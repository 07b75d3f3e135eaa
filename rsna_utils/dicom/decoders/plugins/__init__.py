"""The decoder plug-ins, one module each: every module of this folder is one (found by
`registry.plugin_names`, no list to edit). A plug-in declares NAME, DEVICE ("cpu" or "gpu"),
SYNTAXES, PACKAGES, ORDER (`auto` tries lower first, per device), `why_unavailable()` (None,
or why not, in words), `is_available()` and `decode(path, header)`; a GPU plug-in also has
`BatchDecoder`. A plug-in never imports the registry."""
