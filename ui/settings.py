"""The tunable settings as the app shows them: one control per pipeline config field.

Everything (defaults, ranges, steps, help) comes from `pipeline.config.describe()`, so the app
and the CLI cannot drift apart. Each field gets an API parameter name, e.g. "refine.iterations" ->
``refine_iterations`` (stage names hold no underscore, so the name maps back unambiguously).
"""

from __future__ import annotations

import re
from typing import Any, Dict, List

from pipeline.config import FieldSpec, ReconstructionConfig, apply_overrides, describe, preset

# The seed and the camera source have their own controls next to the preset (they change what is
# done, not its quality), so the Advanced accordion leaves them out.
SEED_KEY = "refine.seed"
CAMERA_SOURCE_KEY = "cameras.source"
_OWN_LABELS = {SEED_KEY: "Seed", CAMERA_SOURCE_KEY: "Camera source"}
# A setting's key as the pipeline's messages (and the CLI's --set) name it, bare or quoted.
_SETTING_KEY = re.compile(r"(['`]?)\b(" + "|".join(re.escape(s.key) for s in describe()) + r")\b\1")


def api_name(key: str) -> str:
    return key.replace(".", "_", 1)


def label(key: str) -> str:
    """The page's label of a setting: "cameras.exclude_bad_masks" -> "Exclude bad masks"."""
    return _OWN_LABELS.get(key) or key.split(".")[1].replace("_", " ").capitalize()


def page_words(text: str) -> str:
    """A pipeline message in the page's words: each setting key becomes the label of its control,
    quoted ("set cameras.exclude_bad_masks off" -> "set 'Exclude bad masks' off")."""
    return _SETTING_KEY.sub(lambda match: f"'{label(match.group(2))}'", text)


def advanced_fields(config: ReconstructionConfig) -> List[FieldSpec]:
    """The fields shown in the Advanced accordion, with ``config``'s values as defaults."""
    return [spec for spec in describe(config) if spec.key not in (SEED_KEY, CAMERA_SOURCE_KEY)]


def camera_source_field() -> FieldSpec:
    """The camera source setting (choices, default, help), for its own control."""
    return next(spec for spec in describe(ReconstructionConfig()) if spec.key == CAMERA_SOURCE_KEY)


def preset_values(preset_name: str) -> Dict[str, Any]:
    """{API name: value} of every Advanced field under the named preset (what the sliders show)."""
    return {api_name(spec.key): spec.default for spec in advanced_fields(preset(preset_name))}


def build_config(preset_name: str, seed: Any, values: Dict[str, Any], initial_values: Dict[str, Any],
                 controls_follow_preset: bool, camera_source: Any = None) -> ReconstructionConfig:
    """The config of one run: the preset, then the Advanced values, then the seed and camera source.

    In the page the controls always show the preset's values plus the user's edits, so all of
    them apply (``controls_follow_preset``). An API caller that passes only some values gets the
    page's initial values for the rest; those must not undo the preset it asked for, so only the
    values that differ from ``initial_values`` apply. Raises PipelineError for a bad value.
    """
    by_api_name = {api_name(spec.key): spec.key for spec in advanced_fields(ReconstructionConfig())}
    overrides = {
        by_api_name[name]: value
        for name, value in values.items()
        if value is not None and (controls_follow_preset or value != initial_values.get(name))
    }
    if seed is not None:
        overrides[SEED_KEY] = seed
    if camera_source is not None:
        overrides[CAMERA_SOURCE_KEY] = camera_source
    return apply_overrides(preset(preset_name), overrides)
