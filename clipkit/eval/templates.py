"""Prompt templates for zero-shot classification: built-in sets, or a file with one template per line,
``{}`` or CLIP_benchmark's ``{c}`` marking where the class name goes."""

from __future__ import annotations

from pathlib import Path

from clipkit.data.classes import read_lines

BUILTIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    # The single prompt of CLIP's paper baseline.
    "simple": ("a photo of a {}.",),
    # Photographs of objects, with the variations web alt-text usually has.
    "photo": (
        "a photo of a {}.",
        "a photo of the {}.",
        "a close-up photo of a {}.",
        "a cropped photo of a {}.",
        "a bright photo of a {}.",
        "a dark photo of a {}.",
        "a blurry photo of a {}.",
        "a low resolution photo of a {}.",
        "a good photo of a {}.",
        "a photo of a small {}.",
        "a photo of a large {}.",
        "an image of a {}.",
        "a picture of a {}.",
        "a drawing of a {}.",
        "a rendering of a {}.",
        "art of a {}.",
    ),
    # Sound events, CLAP-style.
    "audio": (
        "the sound of a {}.",
        "a recording of a {}.",
        "{} can be heard.",
        "an audio clip of {}.",
        "this is the sound of {}.",
    ),
    # Short clips of actions or moving things.
    "video": (
        "a video of {}.",
        "a clip of {}.",
        "a video of a person {}.",
        "footage of {}.",
    ),
}

DEFAULT_TEMPLATES = {"image": "photo", "audio": "audio", "video": "video"}


def resolve_templates(spec: str | None, modality: str, beside_dataset: Path | None = None) -> list[str]:
    """Templates from ``spec`` (a built-in set's name or a file); without it, the dataset's
    ``zeroshot_classification_templates.txt`` if there is one, else the modality's built-in set."""
    if spec is not None and spec in BUILTIN_TEMPLATES:
        return list(BUILTIN_TEMPLATES[spec])
    if spec is not None:
        if not Path(spec).is_file():
            raise FileNotFoundError(
                f"templates {spec!r} is neither a file nor a built-in set ({', '.join(BUILTIN_TEMPLATES)})")
        templates = read_lines(Path(spec), "prompt templates")
    elif beside_dataset is not None and beside_dataset.is_file():
        templates = read_lines(beside_dataset, "prompt templates")
    else:
        return list(BUILTIN_TEMPLATES[DEFAULT_TEMPLATES.get(modality, "simple")])
    missing = [t for t in templates if "{}" not in t and "{c}" not in t]
    if missing:
        raise ValueError(f"templates need a {{}} or {{c}} where the class name goes; {missing[0]!r} has none")
    return templates


def fill_template(template: str, classname: str) -> str:
    """One prompt: ``template`` with the class name at its ``{}`` or ``{c}`` (CLIP_benchmark's marker)."""
    return template.format(c=classname) if "{c}" in template else template.format(classname)
