"""Concept-based (global) explanations: `xai concepts tcav` and `xai concepts extract`.

    config.py    ConceptsConfig: the YAML of both commands (validated, one-line errors)
    acts.py      image sets decoded in DataLoader workers, activations and layer gradients streamed
    tcav.py      TCAV (Kim et al. 2018): CAVs, scores, t-test vs random-vs-random, Bonferroni
    extract.py   CRAFT-style extraction: crops, NMF concepts, importance, atlas, concept maps

Outputs go to OUT/concepts/ (docs/concepts.md); the per-image concept maps of `extract` go
through `xai explain` with the `concept_maps` method (xaicli/methods/concept_maps.py), whose NMF
and factorisation file live in xaicli/nmf.py (layer 0, so the method needs nothing from here).
"""
