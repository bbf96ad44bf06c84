"""Phase 2, greedy replacement: the pure decisions (`decisions`), the fast scorer of a round (`scorer`, built
on `layerwise` replay), the plain and fast evaluators and the search driver (`greedy_search`), acceptance
rules (`acceptance`), placement baselines (`baselines`) and the whole method as one listing (`reference`)."""
