"""The built-in studies take the new blocks by override, without editing the study files (README, Sweeps)."""

import torch

from hybrids.model import HybridLM
from hybrids.training.config import compose
from search.identity import StudyIdentity
from search.objective import Objective
from search.study_config import load_study

GDN_SPACING = [  # attention-spacing with Gated DeltaNet as the backbone, matched to the 2G:A* hybrid
    "study=attention-spacing",
    'space={model.layout: {choices: ["G", "2G:A*", "G:A*", "A+F"]}}',
    "match={by: params, reference: [\"model.layout='2G:A*'\"], multiple_of: 2}",
]


def arms(overrides: list[str]) -> dict[str, HybridLM]:
    """The model of each arm's first trial (meta device), by layout."""
    config, extra = load_study(overrides)
    objective = Objective(config, StudyIdentity(config.name, 1, "0123456789"), extra, parent_run_id=None)
    models = {}
    for point in config.grid():
        layout = point["model.layout"]
        if layout not in models:
            with torch.device("meta"):
                models[layout] = HybridLM(compose(objective.overrides(point, 0)).model)
    return models


def count(model: HybridLM) -> int:
    return sum(p.numel() for p in model.parameters())


def test_attention_spacing_with_a_gated_deltanet_backbone():
    models = arms(GDN_SPACING)
    assert list(models) == ["G", "2G:A*", "G:A*", "A+F"]
    assert {type(layer.mixer).__name__ for layer in models["2G:A*"].layers} == {"GatedDeltaNet"}
    reference = count(models["2G:A*"])
    assert models["2G:A*"].config.d_model == 64  # the reference keeps zamba-tiny's width
    for layout, model in models.items():  # every arm widened (in steps of 2) to the reference's parameters
        assert abs(count(model) - reference) / reference < 0.05, (layout, count(model), reference)


def test_zoology_fig2_with_gated_deltanet_and_sliding_window_rows():
    """The override documented in recipes/study/zoology-fig2.yaml adds G and W rows to the same grid."""
    models = arms(["study=zoology-fig2", 'space={model.layout: {choices: [A, M, M2, "M:A*", G, W]}, '
                   "model.d_model: {choices: [64, 128]}, variant: {choices: [seq64_kv4, seq128_kv8]}}",
                   "train.++model.blocks.sliding_attention.window=32",
                   "train.++model.blocks.sliding_attention.n_heads=1"])
    assert list(models) == ["A", "M", "M2", "M:A*", "G", "W"]
    window = models["W"].layers[0].mixer.config
    assert (window.window, window.n_heads) == (32, 1)


def test_mad_with_gated_deltanet_and_sliding_window_rows():
    """The override documented in recipes/study/mad.yaml."""
    models = arms(["study=mad", 'space={model.layout: {choices: ["A+F", "M+F", "A+F:M+F", "G+F", "W+F"]}, '
                   "variant: {choices: [in_context_recall, memorization]}}",
                   "train.++model.blocks.sliding_attention.n_heads=1"])
    assert list(models) == ["A+F", "M+F", "A+F:M+F", "G+F", "W+F"]
    assert [type(b).__name__ for b in (models["W+F"].layers[1].mixer, models["W+F"].layers[1].mlp)] == \
        ["SlidingWindowAttention", "MLP"]
