"""The techniques: plugins that register a Transform (and, if they save one, a module type).

A technique imports only the floors below it, never another technique family's module;
``slimformer.plugins`` imports them all.
"""
