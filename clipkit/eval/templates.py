"""Prompt templates for zero-shot classification: built-in sets (each modality plug-in brings its own),
or a file with one template per line, ``{}`` or CLIP_benchmark's ``{c}`` marking where the class name goes."""

from __future__ import annotations

from pathlib import Path

from clipkit.data.classes import read_lines

# The single prompt of CLIP's paper baseline: the default of a modality without template sets.
SIMPLE = "simple"
SIMPLE_TEMPLATES = ("a photo of a {}.",)


def builtin_templates() -> dict[str, tuple[str, ...]]:
    """Every built-in set by name: ``simple`` and the sets of the registered modalities (``photo``, ``audio``, ...)."""
    from clipkit.modalities.base import registered_modalities  # the plug-ins import torch: not at `--help`

    sets = {SIMPLE: SIMPLE_TEMPLATES}
    for plugin in registered_modalities().values():
        sets.update(plugin.template_sets)
    return sets


def default_template_set(modality: str) -> str:
    """The name of the built-in set zero-shot uses for ``modality`` when none is given."""
    from clipkit.modalities.base import registered_modalities

    plugin = registered_modalities().get(modality)
    return next(iter(plugin.template_sets), SIMPLE) if plugin is not None else SIMPLE


def resolve_templates(spec: str | None, modality: str, beside_dataset: Path | None = None) -> list[str]:
    """Templates from ``spec`` (a built-in set's name or a file); without it, the dataset's
    ``zeroshot_classification_templates.txt`` if there is one, else the modality's built-in set."""
    builtin = builtin_templates()
    if spec is not None and spec in builtin:
        return list(builtin[spec])
    if spec is not None:
        if not Path(spec).is_file():
            raise FileNotFoundError(f"templates {spec!r} is neither a file nor a built-in set ({', '.join(builtin)})")
        templates = read_lines(Path(spec), "prompt templates")
    elif beside_dataset is not None and beside_dataset.is_file():
        templates = read_lines(beside_dataset, "prompt templates")
    else:
        return list(builtin[default_template_set(modality)])
    missing = [t for t in templates if "{}" not in t and "{c}" not in t]
    if missing:
        raise ValueError(f"templates need a {{}} or {{c}} where the class name goes; {missing[0]!r} has none")
    return templates


def fill_template(template: str, classname: str) -> str:
    """One prompt: ``template`` with the class name at its ``{}`` or ``{c}`` (CLIP_benchmark's marker)."""
    return template.format(c=classname) if "{c}" in template else template.format(classname)
